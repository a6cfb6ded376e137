"""Build .gpu/ in the repository root, to carry to a GPU machine (add `/.gpu/` to .git/info/exclude): MiniLM in
float16 safetensors (the float32 file is 90 MB, over the carry limit; every run there, float32 and bf16 alike,
loads these same weights and upcasts them), its tokenizer, the MRPC files, and run.sh. Wheels the GPU machine
lacks (pydantic, fastapi, uvicorn, httptools and their dependencies; aiohttp, aiohappyeyeballs, aiosignal, attrs,
frozenlist, multidict, propcache and yarl for bench_serve's load generator) go in .gpu/whl:
`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/whl ...`

    python scripts/gpu_bundle/make_bundle.py
    bash .gpu/run.sh seeds3      # on the GPU machine, from the repository root
"""

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from softprompt_cli.hub import packaged_model_path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / ".gpu"
source = Path(packaged_model_path("sentence-transformers/all-MiniLM-L6-v2"))
target = HERE / "minilm"
target.mkdir(parents=True, exist_ok=True)
tensors = load_file(source / "model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in tensors.items()},
          target / "model.safetensors", metadata={"format": "pt"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(source / name, target / name)
glue = HERE / "glue" / "MRPC"
glue.mkdir(parents=True, exist_ok=True)
for name in ("train.tsv", "dev.tsv"):
    shutil.copy(ROOT.parent / "shared" / "data" / "glue" / "MRPC" / name, glue / name)
shutil.copy(Path(__file__).with_name("run.sh"), HERE / "run.sh")
