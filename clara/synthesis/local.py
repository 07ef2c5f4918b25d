"""`--llm hf:MODEL_OR_PATH`: a local Hugging Face model answering the synthesis requests in batches.

Requests from every document in flight queue up; one worker generates them `batch_size` at a time (left-padded,
on this process's GPU when there is one) while the next ones gather. Decoding is not constrained to the
schema: the answers are parsed strictly like any server's, and malformed ones are asked for again, then skipped.
Under torchrun every process loads its own copy and works on its own shards (clara.synthesis.pipeline).
"""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoModelForCausalLM

from clara.config import TINY_MODEL_NAME
from clara.model.load import Runtime
from clara.model.tiny_base import tiny_model_dir
from clara.model.tokenizer import load_tokenizer
from clara.synthesis.llm import ChatRequest, GenerationSettings, Reply


class LocalChat:
    def __init__(self, model_path: str, settings: GenerationSettings, batch_size: int, runtime: Runtime):
        path = tiny_model_dir() if model_path == TINY_MODEL_NAME else model_path
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.dtype, attn_implementation=runtime.attn)
        self.model = model.to(runtime.device).eval()
        self.settings, self.batch_size, self.device = settings, batch_size, runtime.device
        self.queue: list[tuple[ChatRequest, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        self.in_flight = 0

    async def chat(self, request: ChatRequest) -> Reply:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self.queue:
            await asyncio.sleep(0)  # let every document waiting to run queue its request first
            batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
            self.in_flight = len(batch)
            try:
                replies = await asyncio.to_thread(self._generate, [request for request, _ in batch])
            except Exception as error:  # handed to the waiting documents, which raise it
                replies = [error] * len(batch)
            finally:
                self.in_flight = 0
            for (_, future), reply in zip(batch, replies):
                if future.done():  # its document was cancelled (another one failed)
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    @torch.inference_mode()
    def _generate(self, requests: list[ChatRequest]) -> list[Reply]:
        prompts = [
            self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in requests
        ]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.settings.temperature > 0
        # One seed per batch, from its requests: the same batches sample the same answers.
        torch.manual_seed(sum(r.seed for r in requests) % 2**63)
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.settings.max_tokens,
            do_sample=sample,
            temperature=self.settings.temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = output[:, inputs["input_ids"].shape[1] :]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        replies = []
        for row, used in zip(new, prompt_tokens):
            generated = row[row != self.tokenizer.pad_token_id]
            replies.append(
                Reply(self.tokenizer.decode(generated, skip_special_tokens=True), int(used), int(generated.numel()))
            )
        return replies

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker
