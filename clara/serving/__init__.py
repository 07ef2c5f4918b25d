"""Serving a trained model over HTTP: `python -m clara.serve` (this package's `__main__`; clara/serve.py keeps
that path) runs it.

- `engine`: the model side, one thread that answers queued requests in batches from a corpus index
  (clara.index, clara.evaluation.inference, clara.model.decoding);
- `vllm_engine`: the engine whose answers a vLLM server generates from the prompt embeddings clara builds
  (`--engine vllm`; the server started through clara.vllm_server, the export from clara.model.vllm_export);
- `app`: the OpenAI-compatible FastAPI application over an engine (`create_app`), with the types of
  clara.openai_protocol, and the page to try it (`page.html`, package data).

- `__main__`: the command line, its settings checked before torch loads.

It may import the rest of clara but clara.training and clara.synthesis; nothing in clara imports it but the
command line's old path, clara/serve.py.
"""
