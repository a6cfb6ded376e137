"""Baseline (c) of scripts/bench_serve.py: what PEFT users serve today. A FastAPI app around one PeftModel holding
several prompt-tuning adapters; every request takes a lock, switches the active adapter (`set_adapter`) and runs
alone. It answers the request formats of `softprompt serve`:

    POST /v1/completions {"model": NAME, "prompt": "text", "max_tokens": 8, "temperature": 0}  (CAUSAL_LM adapters)
    POST /v1/classify    {"model": NAME, "input": ["text", ["text", "pair"], ...]}             (SEQ_CLS adapters)
    GET  /health, GET /v1/models

    python scripts/peft_serve_app.py --base MODEL_DIR [--gguf-file FILE] --adapter NAME=DIR ... --port 8001 \
        [--device cuda]

The base model is loaded with transformers' from_pretrained (a GGUF file is dequantized to float32, as softprompt
does), the adapters with PeftModel.from_pretrained / load_adapter. Greedy generation only (temperature 0).
Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False


class ClassifyRequest(BaseModel):
    model: str
    input: str | list


def load(args):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    adapters = [a.partition("=") for a in args.adapter]
    first_config = json.loads((Path(adapters[0][2]) / "adapter_config.json").read_text())
    causal_lm = first_config["task_type"] == "CAUSAL_LM"
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.base, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if causal_lm:
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, **extra)
    else:
        labels = json.loads((Path(adapters[0][2]) / "label_names.json").read_text())
        base = AutoModelForSequenceClassification.from_pretrained(
            args.base, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, **extra)
    base.eval()
    name, _, directory = adapters[0]
    model = PeftModel.from_pretrained(base, directory, adapter_name=name)
    label_names = {}
    for name, _, directory in adapters:
        if name not in model.peft_config:
            model.load_adapter(directory, adapter_name=name)
        labels_file = Path(directory) / "label_names.json"
        if labels_file.is_file():
            label_names[name] = json.loads(labels_file.read_text())
    model.to(args.device).eval()
    if causal_lm and not args.no_cache_fix:
        name_cache_past_key_values(model)
    return model, tokenizer, causal_lm, label_names


def name_cache_past_key_values(model) -> None:
    """Make PeftModel.generate work with prompt tuning on transformers 5: transformers' prepare_inputs_for_generation
    now hands the KV cache on as `cache`, while PEFT (0.21.2 and earlier) looks for `past_key_values` to tell the
    first step from the next ones. Without this, PEFT sees no cache at every step and inserts the virtual tokens
    again before each new token, so everything after the first generated token is wrong. transformers (< 5.40)
    still accepts `past_key_values`."""
    import inspect

    original = model.base_model_prepare_inputs_for_generation
    if "cache" not in inspect.signature(original).parameters:
        return

    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = prepare


def end_tokens(model, tokenizer) -> list[int]:
    """EOS and the generation config's end tokens (a turn's end beside EOS in instruction-tuned models); a
    classifier has no generation config."""
    configured = model.generation_config.eos_token_id
    listed = configured if isinstance(configured, list) else [configured]
    return [i for i in dict.fromkeys([tokenizer.eos_token_id, *listed]) if i is not None]


def make_app(model, tokenizer, causal_lm: bool, label_names: dict[str, list[str]]) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()
    ends = end_tokens(model, tokenizer) if causal_lm else []
    names = list(model.peft_config)
    created = int(time.time())

    def adapter(name: str) -> str:
        if name not in model.peft_config:
            raise HTTPException(404, f"model {name!r} not found; loaded: {', '.join(names)}")
        return name

    @app.get("/health")
    def health():
        return {"status": "ok", "models": names}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "peft"}
                                           for n in names]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        name = adapter(request.model)
        if not causal_lm:
            raise HTTPException(400, "these adapters classify: use /v1/classify")
        if request.temperature != 0 or request.stream:
            raise HTTPException(400, "this baseline generates greedily (temperature 0) without streaming")
        encoded = tokenizer(request.prompt, return_tensors="pt").to(model.device)
        with lock, torch.inference_mode():
            model.set_adapter(name)
            output = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                    max_new_tokens=request.max_tokens, do_sample=False,
                                    eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        new = output[0, encoded["input_ids"].shape[1]:].tolist()
        stopped = any(token in ends for token in new)
        if stopped:
            new = new[:next(i for i, token in enumerate(new) if token in ends)]
        text = tokenizer.decode(new, skip_special_tokens=True)
        prompt_tokens = encoded["input_ids"].shape[1]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                            "finish_reason": "stop" if stopped else "length"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new),
                          "total_tokens": prompt_tokens + len(new)}}

    @app.post("/v1/classify")
    def classify(request: ClassifyRequest):
        name = adapter(request.model)
        if causal_lm:
            raise HTTPException(400, "these adapters generate: use /v1/completions")
        inputs = [request.input] if isinstance(request.input, str) else request.input
        data = []
        for index, item in enumerate(inputs):  # one row at a time: no padding, as a plain app would
            texts = [item] if isinstance(item, str) else list(item)
            encoded = tokenizer(*texts, return_tensors="pt", truncation=True, max_length=512).to(model.device)
            with lock, torch.inference_mode():
                model.set_adapter(name)
                probabilities = model(**encoded).logits.float().softmax(-1)[0].tolist()
            labels = label_names.get(name) or [f"LABEL_{i}" for i in range(len(probabilities))]
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            data.append({"index": index, "label": labels[best], "score": probabilities[best],
                         "probabilities": dict(zip(labels, probabilities))})
        return {"object": "list", "model": name, "data": data}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base model's folder")
    parser.add_argument("--gguf-file", help="a GGUF file in that folder (dequantized to float32)")
    parser.add_argument("--adapter", action="append", required=True, help="NAME=DIR of a PEFT adapter folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-cache-fix", action="store_true",
                        help="run PEFT's generate as it is (on transformers 5 its answers go wrong after the first "
                        "token; see name_cache_past_key_values)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    app = make_app(*load(args))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
