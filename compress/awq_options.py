"""Two switches GPTQModel's AWQ does not expose, applied around one quantize() call.

GPTQModel 7.6's AWQProcessor hard-codes both: clipping on (`apply_clip = True`, each group's
range fitted on 512 subsampled tokens), and a scale search whose 20 candidates are
`x_mean^r / w_mean^(1-r)`, so at r = 0 it tries `1 / w_mean`, never "no scaling" (scale 1). Where
no candidate beats plain rounding, AWQ must still apply one, and can end below RTN. `scale_one`
adds the unscaled candidate, scored exactly as the others (the same chunked squared error of the
block's output); `clip=False` skips the clipping fit. Both patch the class only inside the
`with` block (quantizing is one call at a time per process).
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def awq_options(*, clip: bool = True, scale_one: bool = False):
    """Yields counts: scale searches run, and how many chose scale 1 (the manifest records them)."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    stats = {"scale_searches": 0, "unscaled_chosen": 0}
    original_init, original_search = AWQProcessor.__init__, AWQProcessor._compute_best_scale

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.apply_clip = clip

    def search(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        import torch

        scales, error = original_search(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)
        with torch.inference_mode():
            saved = [fc.weight.detach().clone() for fc in linears2scale]
            for fc in linears2scale:
                self._pseudo_quantize_tensor_into(fc.weight, fc.weight)
            total, count = 0.0, 0
            for ref, out in zip(self._iter_reference_output_chunks(x, fp16_output),
                                self._iter_module_forward_outputs(x, module2inspect, kwargs)):
                diff = (ref.to(device=out.device, dtype=out.dtype) - out).float()
                total += diff.pow(2).sum().item()
                count += diff.numel()
            for fc, w in zip(linears2scale, saved):
                fc.weight.copy_(w)
        unscaled = total / max(count, 1)
        stats["scale_searches"] += 1
        stats["unscaled_chosen"] += int(unscaled < error)
        return (torch.ones_like(scales), unscaled) if unscaled < error else (scales, error)

    AWQProcessor.__init__ = init
    if scale_one:
        AWQProcessor._compute_best_scale = search
    try:
        yield stats
    finally:
        AWQProcessor.__init__, AWQProcessor._compute_best_scale = original_init, original_search
