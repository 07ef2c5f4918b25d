"""CLaRa training toolkit. `from clara import CLaRa` loads a trained checkpoint for inference."""

__all__ = ["CLaRa"]
# The package version (pyproject.toml's; tests/test_main.py keeps the two equal): `clara --version`.
__version__ = "0.4.1"


def __getattr__(name: str):
    # Imported on first use, so that light modules (config, cli) do not pull in torch and transformers.
    if name == "CLaRa":
        from clara.evaluation.inference import CLaRa

        return CLaRa
    raise AttributeError(f"module 'clara' has no attribute {name!r}")
