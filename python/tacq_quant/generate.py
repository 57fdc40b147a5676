"""Text generation with an fp model or a tacq-kernels checkpoint (``tacq generate``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def build_inputs(tokenizer, prompt: str, chat: bool = True):
    """Token ids for ``prompt``, wrapped in the tokenizer's chat template when it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    # only these two: some tokenizers add token_type_ids, which generate() of transformers 4.x refuses
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = True,
    temperature: float = 0.0,
    stream: bool = False,
) -> GenerationResult:
    """Generate a continuation of ``prompt`` (greedy when ``temperature == 0``).

    With ``stream=True`` tokens are printed to stdout as they are produced.
    """
    from transformers import TextStreamer

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in build_inputs(tokenizer, prompt, chat).items()}
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    return GenerationResult(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)


def add_arguments(p) -> None:
    from .cli import _positive_int

    p.add_argument("--model", default=None, help="checkpoint dir, HF dir/hub id or .gguf (default: the default model)")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run(args) -> int:
    from .cli import _check_model_arg, _device
    from .models import load_model

    device = _device(args.device)
    _check_model_arg(args.model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
    result = generate(
        model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat, temperature=args.temperature,
        stream=True,
    )
    print(f"\n[{result.new_tokens} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tokens/s on {device}]")
    return 0
