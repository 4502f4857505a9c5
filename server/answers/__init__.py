"""A local engine answers one OpenAI request: plan the choices, run them, build the response (a dict)
or the stream of chunk dicts. No HTTP here: the routes turn these into JSON or SSE."""
