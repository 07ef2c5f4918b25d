"""`python -m clara.export`: write a checkpoint in the official release layout (or the native one).

    python -m clara.export --checkpoint checkpoints/clara_stage2 --format official --out release/compression-32
    python -m clara.export --checkpoint apple/CLaRa-7B-E2E/compression-16 --format native --out clara_e2e
    python -m clara.export --checkpoint checkpoints/clara_stage2 --format vllm --out clara_vllm

The official layout is the one Apple's CLaRa release uses, so that its code and ours both read it:
  config.json                     the release's configuration fields (decoder_model_name, compr_rate, ...)
  adapters.pth                    {adapter name: LoRA state dict}, keys relative to the transformers model
  decoder_first_last_layers.pth   the embedding and LM-head matrices, resized to the tokenizer's length
  tokenizer files
The .pth files hold plain tensor dicts (read back with torch.load(weights_only=True)). The release's
`modeling_clara.py` is not written: loading an export with the official code needs that file beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from peft import get_peft_model_state_dict

from clara.cli import add_model_flags
from clara.config import STAGES, ConfigError
from clara.data.fingerprint import base_model_key
from clara.errors import exit_status
from clara.files import publish_files
from clara.locks import holding
from clara.model.checkpoint import PEFT_PREFIX, read_config, save_model
from clara.model.hub import resolve_checkpoint
from clara.model.load import choose_runtime, load_for_use
from clara.model.model import ClaraModel
from clara.model.stage_model import infer_stage
from clara.model.vllm_export import write_vllm_export

OFFICIAL_MODEL_TYPE = "CLaRa"


def official_config(model: ClaraModel, stage: str) -> dict:
    """The release's config.json for this model: its CLaRaConfig fields with the values our model implies
    (the compressor is the decoder with its own adapter, one memory token per slot position, LoRA on all
    linear layers, memory embeddings trained)."""
    settings = model.settings
    return {
        "model_type": OFFICIAL_MODEL_TYPE,
        "architectures": [OFFICIAL_MODEL_TYPE],
        "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"},
        "decoder_model_name": settings.base_model,
        # Not a field of the release: the key a later stage's MODEL_PATH is checked against.
        "base_model_key": base_model_key(settings.base_model),
        "doc_max_length": settings.doc_max_length,
        "compr_rate": settings.compress_rate,
        "generation_top_k": settings.generation_top_k,
        "training_stage": stage,
        "sep": True,
        "lora": True,
        "lora_r": settings.lora_r,
        "lora_r_compressor": settings.lora_r,
        # Not a field of the release (it trains with alpha = 2 r); written so that another alpha survives.
        "lora_alpha": settings.lora_alpha,
        "lora_compressor": False,
        "compr_model_name": None,
        "different_mem_tokens": True,
        "optimize_mem_tokens": True,
        "training_form": "both",
        "quantization": "no",
        "load_adapters": True,
        "kbtc_training": False,
        "stage2_retrieval_top_n": 1,
    }


def official_adapters(model: ClaraModel) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's LoRA weights under the release's keys: relative to the transformers model, as
    transformers' get_adapter_state_dict writes them (no "base_model.model." prefix, no adapter name)."""
    adapters = {}
    for name in model.adapter_names:
        state = get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False)
        adapters[name] = {
            key.removeprefix(PEFT_PREFIX): value.detach().cpu().contiguous() for key, value in state.items()
        }
    return adapters


def official_first_last_layers(model: ClaraModel) -> dict[str, torch.Tensor]:
    """The embedding (memory rows from their trained parameter) and, when untied, the LM head, cut to the
    tokenizer's length as the release resizes them; keys as the transformers model names its parameters."""
    rows = len(model.tokenizer)
    names = {id(param): name for name, param in model.causal_lm.named_parameters()}
    embedding = model.causal_lm.get_input_embeddings().weight
    embed = embedding.detach()[:rows].clone()
    embed[list(model.tokens.mem_ids)] = model.mem_embeddings.detach().to(embed)
    layers = {names[id(embedding)]: embed.cpu()}
    head = model.causal_lm.get_output_embeddings().weight
    if head is not embedding:  # tied weights: the release's named_parameters() lists the matrix once
        layers[names[id(head)]] = head.detach()[:rows].clone().cpu()
    return layers


def write_official(model: ClaraModel, out_dir: str, stage: str) -> None:
    """The release layout, written aside and published in one step (clara.files.publish_files)."""
    publish_files(out_dir, lambda aside: _write_official_files(model, aside, stage))


def _write_official_files(model: ClaraModel, out_dir: str, stage: str) -> None:
    torch.save(official_adapters(model), os.path.join(out_dir, "adapters.pth"))
    torch.save(official_first_last_layers(model), os.path.join(out_dir, "decoder_first_last_layers.pth"))
    model.tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(official_config(model, stage), handle, indent=2)


def checkpoint_stage_of(checkpoint: str, stage: str | None) -> str:
    found = stage or infer_stage(checkpoint)
    if found is None:
        raise ConfigError(
            "checkpoint",
            checkpoint,
            "--stage stage1 or stage1_2 as well: the official layout records "
            "no stage and this one has no query_reasoner_adapter (stage2)",
        )
    return found


def push_to_hub(out_dir: str, repo_id: str, path_in_repo: str) -> str:
    """Upload the export; returns the id that loads it back."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            folder_path=out_dir,
            repo_id=repo_id,
            path_in_repo=path_in_repo or None,
            commit_message=f"CLaRa checkpoint {path_in_repo or ''}".strip(),
            ignore_patterns=[".lock*", ".export*"],
        )  # this machine's locks (clara.locks)
    except HfHubHTTPError as error:
        raise ConfigError(
            "push_to_hub",
            repo_id,
            f"a repository HF_TOKEN may write to; the Hub refused the upload ({str(error).splitlines()[0]})",
        ) from error
    return f"{repo_id}/{path_in_repo}" if path_in_repo else repo_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (native or official layout) or Hugging Face Hub id"
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=("official", "native", "vllm"),
        help="official: the release layout (.pth files, its config.json); native: this toolkit's; vllm: the "
        "generator alone (adapter merged, heads padded where vLLM's CPU attention needs it), a model folder vLLM "
        "loads for `clara serve --engine vllm --vllm_model DIR`",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default=None,
        help="stage to record (default: the checkpoint's; official stage1/stage1_2 record none)",
    )
    add_model_flags(parser, note="loaded on the CPU: ")
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    parser.add_argument(
        "--push_to_hub",
        metavar="REPO",
        default=None,
        help="upload the export to this Hub repository (needs HF_TOKEN with write access)",
    )
    parser.add_argument(
        "--path_in_repo",
        default=None,
        help="folder in that repository (default: compression-<rate>, as in the release)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        with holding(args.out, "python -m clara.export"):
            export(args)

    return exit_status(body)


def export(args: argparse.Namespace) -> None:
    """Write the export into --out (which this process holds) and upload it when asked."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    stage = checkpoint_stage_of(checkpoint, args.stage)
    if os.path.realpath(args.out) == os.path.realpath(checkpoint):
        raise ConfigError("out", args.out, "a directory other than the checkpoint itself")
    # On the CPU (auto: fp32, the weights as trained): writing the files needs no GPU.
    model, _ = load_for_use(checkpoint, choose_runtime("cpu", args.dtype, args.flash_attn), args.model_path)
    if args.format == "vllm":
        fingerprint = write_vllm_export(model, args.out)
        print(f"Wrote {args.checkpoint}'s generator for vLLM (fingerprint {fingerprint}) to {args.out}")
        return
    if args.format == "official":
        write_official(model, args.out, stage)
    else:
        save_model(model, args.out, stage)
    read_config(args.out)  # what was written reads back as a checkpoint
    print(f"Wrote {args.checkpoint} ({stage}) in the {args.format} layout to {args.out}")
    if args.push_to_hub:
        path_in_repo = args.path_in_repo
        if path_in_repo is None:
            path_in_repo = f"compression-{model.settings.compress_rate}"
        loaded_as = push_to_hub(args.out, args.push_to_hub, path_in_repo)
        print(
            f"Uploaded to https://huggingface.co/{args.push_to_hub}; load it with CLaRa.from_pretrained({loaded_as!r})"
        )


if __name__ == "__main__":
    sys.exit(main())
