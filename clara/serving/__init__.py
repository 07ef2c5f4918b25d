"""Serving a trained model over HTTP: `python -m clara.serve` (clara/serve.py) runs it.

- `engine`: the model side, one thread that answers queued requests in batches from a corpus index
  (clara.index, clara.inference, clara.decoding);
- `app`: the OpenAI-compatible FastAPI application over an engine (`create_app`), with the types of
  clara.openai_protocol, and the page to try it (`page.html`, package data).

It may import the rest of clara; nothing in clara imports it but the command module clara.serve.
"""
