"""A user's own project, built the way a newcomer's would be: nothing here comes from
stepprobe's demo.

    project/
      myreward.py            the user's reward module (TRL signature), next to the config
      data/train.jsonl       a conversational task: {"prompt": [{"role": "user", ...}], "answer"}
      models/base/           a tiny LlamaForCausalLM + word-level chat tokenizer (pad = eos)
      runs/grpo/             TRL GRPOTrainer output: checkpoint-1 .. checkpoint-STEPS

The run: loss_type="grpo", beta=0.02 (a KL term, so a reference model), a cosine schedule
(its last checkpoint's next-step lr is 0), gradient accumulation 2 (one optimizer step =
per_device_train_batch_size 4 x 2 accumulation steps = 8 completions = 2 prompts x 4).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

STEPS = 3
WORDS = (
    "what color is the sky grass snow sun night blood coal leaf sea cloud milk fire "
    "red green blue white black yellow gray it a very"
).split()
COLORS = {"red", "green", "blue", "white", "black", "yellow", "gray"}
FACTS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "sun": "yellow",
    "night": "black",
    "blood": "red",
    "coal": "black",
    "leaf": "green",
    "sea": "blue",
    "cloud": "gray",
    "milk": "white",
    "fire": "red",
}

REWARD_MODULE = '''"""My reward: 1 for the right color word, 0.25 per other color word (shaping)."""

COLORS = {"red", "green", "blue", "white", "black", "yellow", "gray"}


def reward(completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        words = c[-1]["content"].split()
        out.append(1.0 if a in words else 0.25 * sum(w in COLORS for w in words))
    return out
'''


def build_tokenizer():
    """Word level, a chat template, and pad = eos (a common setup for Llama-style models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<eos>", "<user>", "<assistant>"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %} <eos>{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<eos>",
        padding_side="left",
        chat_template=template,
    )


def build_base(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_task(path: Path, n: int = 48) -> Path:
    rows = []
    subjects = sorted(FACTS)
    for i in range(n):
        s = subjects[i % len(subjects)]
        rows.append({"prompt": [{"role": "user", "content": f"what color is the {s}"}],
                     "answer": FACTS[s]})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def import_user_module(path: Path):
    """The training script imports the user's reward as the user would (their file)."""
    spec = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train(project: Path, steps: int = STEPS, **overrides) -> Path:
    """TRL GRPO on CPU, a checkpoint after every step; returns the run directory."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    base = project / "models" / "base"
    out = project / "runs" / "grpo"
    reward = import_user_module(project / "myreward.py").reward
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=steps,
        learning_rate=2e-2,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=4,
        loss_type="grpo",
        beta=0.02,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_only_model=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    settings.update(overrides)
    trainer = GRPOTrainer(
        model=str(base),  # a path: TRL builds the beta > 0 reference model from it
        reward_funcs=[reward],
        args=GRPOConfig(**settings),
        train_dataset=load_dataset("json", data_files=str(project / "data" / "train.jsonl"))[
            "train"
        ],
        processing_class=AutoTokenizer.from_pretrained(str(base)),
    )
    trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        trainer.train()
    return out


def build_project(project: Path, steps: int = STEPS, **overrides) -> Path:
    """The whole project: reward module, task, base model, and the finished GRPO run."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "myreward.py").write_text(REWARD_MODULE)
    write_task(project / "data" / "train.jsonl")
    build_base(project / "models" / "base")
    train(project, steps=steps, **overrides)
    return project


if __name__ == "__main__":  # `python tests/support/user_run.py DIR`: build a project to try by hand
    import sys

    print(build_project(Path(sys.argv[1])))
