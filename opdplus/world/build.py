"""The demo world: a tokenizer, a teacher and a student for the synthetic math, tool-use and lookup tasks.

``ensure_world()`` returns the directories of a teacher and a student (HF ``save_pretrained`` dirs
with the shared tokenizer), building them in ``$OPDPLUS_CACHE/world-v3`` when missing:

1. a byte-level BPE tokenizer trained on train-split texts of every task (bos/eos/pad, BOS added);
2. a small Llama teacher (4 x 128) trained from scratch by supervised next-token training on
   prompt+solution (loss on the solution only) until greedy decoding solves 98% of dev items of
   every task (the held-out accuracy, on other items, is reported in ``world.json``); the multi-turn task
   ``synthetic_lookup`` is trained on its reference episode (``encode_episodes``: loss on the assistant
   turns only, the tool's reply framed as rollouts frame it) and evaluated by greedy episodes;
3. a student: the teacher pruned to ``student_layers`` of its layers (``opdplus.models.prune``), the
   weight matrices of its first layer perturbed by Gaussian noise (``student_noise``, relative to each
   matrix's standard deviation),
   then briefly trained the same way at a low learning rate, evaluated after every step and kept
   at the state closest to ~30% dev accuracy on every task, so it starts well below the teacher but
   can learn (trained by supervision alone, the same 2-layer student reaches ~99% on math,
   ``docs/results/world.md``).

Everything is seeded and the data order is fixed, so a rebuild gives the same models (up to
floating-point differences between CPU thread counts). Accuracies are greedy
(``opdplus.eval.runner.greedy_accuracy``: the rollout sampler with ``greedy=True``); the learning rate
follows the training loop's ``lr_factor`` (warm-up, then cosine decay to 10%).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdplus.envs.base import is_multi_turn
from opdplus.eval.runner import greedy_accuracy, held_out_items
from opdplus.models.prune import prune_to
from opdplus.rollout.multiturn import EpisodeLimits, assistant_turn_of_text, plain_framing
from opdplus.tasks.base import TaskItem, get_task
from opdplus.tasks.synthetic import solution_of
from opdplus.train.schedule import lr_factor

WORLD_VERSION = "world-v3"  # bump whenever the build changes, so old caches are not reused
WORLD_TASKS = ("synthetic_math", "synthetic_tool_use", "synthetic_lookup")
# the bounds of a greedy episode of the multi-turn task (synthetic_lookup: a call, then the answer; per-turn
# tokens are the caller's max_new_tokens)
WORLD_LIMITS = EpisodeLimits(max_turns=3, max_new_tokens=48, max_episode_tokens=64, tool_timeout_s=0)
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
DEV_SEED = 1  # eval-split seed used to decide when training stops; reported accuracy uses seed 0

Log = Callable[[str], None]


def cache_root() -> Path:
    """``$OPDPLUS_CACHE``, default ``~/.cache/opdplus``."""
    return Path(os.environ.get("OPDPLUS_CACHE") or Path.home() / ".cache" / "opdplus").expanduser()


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 128


@dataclass(frozen=True)
class TrainSpec:
    """Supervised training until every task reaches ``target_acc`` on the dev items (or ``max_steps``).

    ``stop_each_task``: drop a task from the training mix as soon as it reaches the target and end
    at the evaluated state closest to the target (used to park the student at a low accuracy on
    both tasks instead of overshooting on the easy one)."""

    target_acc: float
    max_steps: int
    lr: float = 3e-3
    batch_size: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_every: int = 25
    first_eval: int = 0  # no dev evaluation before this step (it cannot have reached the target yet)
    eval_items: int = 200
    stop_each_task: bool = False
    seed: int = 0


@dataclass(frozen=True)
class WorldSpec:
    teacher: ModelSpec = ModelSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)
    student_layers: int = 2  # the student is the teacher pruned to this many layers (uniformly spread)
    teacher_train: TrainSpec = TrainSpec(
        target_acc=0.98,
        max_steps=1500,
        eval_every=100,
        first_eval=600,
        eval_items=100,
    )
    # the trained teacher keeps most of math and lookup in layer 0, so pruning alone barely hurts (its layers
    # {0, 3} score 0.96 / 0.32 / 1.00 on math / tool use / lookup); Gaussian noise of this many standard
    # deviations on the first kept layer's weight matrices brings them to about 0.5 / 0.1 / 0.0 while the
    # kept layers stay the trained teacher's (a student pruned from an early snapshot instead learns arithmetic
    # too slowly to distil in the demo's budget, docs/results/world.md)
    student_noise: float = 1.0
    student_train: TrainSpec = TrainSpec(
        target_acc=0.30,
        max_steps=60,
        lr=1e-4,  # tool use jumps from ~0 to ~0.5 within two steps at 2e-4: park it by single steps
        warmup_steps=1,
        eval_every=1,
        eval_items=100,
        stop_each_task=True,
        seed=1,
    )
    tokenizer_items: int = 2000  # train items per task used to learn the BPE merges
    train_pool: int = 8000  # train items per task, tokenized once, sampled in a fixed order
    vocab_size: int = 1024
    max_new_tokens: int = 48
    eval_items: int = 200  # held-out items per task for the reported accuracy
    tasks: tuple[str, ...] = WORLD_TASKS


DEFAULT_SPEC = WorldSpec()

# A micro world for smoke tests: same code path, a few steps, nowhere near the target accuracy.
SMOKE_SPEC = WorldSpec(
    teacher=ModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    student_layers=1,
    teacher_train=TrainSpec(target_acc=1.01, max_steps=3, batch_size=8, eval_every=2, eval_items=4),
    student_train=TrainSpec(
        target_acc=1.01, max_steps=2, batch_size=8, eval_every=1, eval_items=4, stop_each_task=True, seed=1
    ),
    tokenizer_items=200,
    train_pool=40,
    max_new_tokens=8,
    eval_items=4,
)


@dataclass
class WorldPaths:
    root: Path
    teacher: Path
    student: Path
    tokenizer: Path
    info: Path = field(init=False)

    def __post_init__(self) -> None:
        self.info = self.root / "world.json"


def world_paths(root: Path | None = None) -> WorldPaths:
    root = Path(root) if root is not None else cache_root() / WORLD_VERSION
    return WorldPaths(root=root, teacher=root / "teacher", student=root / "student", tokenizer=root / "tokenizer")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def world_texts(tasks: tuple[str, ...], n_per_task: int, seed: int = 0) -> list[str]:
    """prompt + solution of ``n_per_task`` train items of every task (a multi-turn item's whole reference
    episode, ``episode_segments``)."""
    texts = []
    for name in tasks:
        task = get_task(name)
        texts += [item.prompt_text + reference_text(task, item) for item in task.items("train", n_per_task, seed)]
    return texts


def reference_text(task, item: TaskItem) -> str:
    """The text after the prompt that the teacher learns: the solution, or a multi-turn item's reference episode
    (``episode_segments``, EOS not included)."""
    if is_multi_turn(task):
        return "".join(text for text, _ in episode_segments(task, item))
    return solution_of(item)


def episode_segments(task, item: TaskItem) -> list[tuple[str, bool]]:
    """A multi-turn item's reference episode as ``(text, sampled)`` segments: its reference assistant turns
    (``meta["turns"]``, sampled = True, each ended by EOS) and between them the environment's replies to
    them, framed as rollouts frame them (``plain_framing``, sampled = False)."""
    env = task.environment(item)
    segments: list[tuple[str, bool]] = []
    try:
        for text in item.meta["turns"]:
            segments.append((text, True))
            reply = env.step(assistant_turn_of_text(text))
            if reply.done:
                break
            segments.append((plain_framing(reply.messages), False))
    finally:
        env.close()
    return segments


def train_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer: Any = None):
    """A byte-level BPE tokenizer (lossless decode) as a ``PreTrainedTokenizerFast`` that adds BOS; pre-tokens
    from ``pre_tokenizer`` (default: GPT-2's byte-level split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=DEFAULT_SPEC.teacher.max_positions,
    )


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------


def make_model(spec: ModelSpec, tokenizer, seed: int):
    """A randomly initialised Llama causal LM sized by ``spec`` (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on BOS and prompt tokens


def encode_episodes(tokenizer, task, items: list[TaskItem]) -> list[Example]:
    """BOS + prompt + the reference episode (``episode_segments``) for each item of a multi-turn task, tokenized
    the way a rollout sees it (prompt, each turn and each framed reply apart); labels on the assistant turns and
    their EOS only."""
    segments = [episode_segments(task, item) for item in items]
    texts = [text for item_segments in segments for text, _ in item_segments]
    segment_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    examples = []
    for item_segments, prompt_ids in zip(segments, tokenizer([item.prompt for item in items])["input_ids"]):
        ids, labels = list(prompt_ids), [-100] * len(prompt_ids)
        for _, sampled in item_segments:
            segment = next(segment_ids)
            segment = segment + [tokenizer.eos_token_id] if sampled else segment
            ids += segment
            labels += segment if sampled else [-100] * len(segment)
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


def encode_task(tokenizer, name: str, items: list[TaskItem]) -> list[Example]:
    """``encode_episodes`` for a multi-turn task, else ``encode_examples``."""
    task = get_task(name)
    return encode_episodes(tokenizer, task, items) if is_multi_turn(task) else encode_examples(tokenizer, items)


def encode_examples(tokenizer, items: list[TaskItem]) -> list[Example]:
    """BOS + prompt + solution + EOS for each item, tokenized the way generation sees it (prompt and
    completion apart, batched for speed)."""
    prompts = tokenizer([item.prompt for item in items])["input_ids"]
    solutions = tokenizer([solution_of(item) for item in items], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt_ids, solution_ids in zip(prompts, solutions):
        completion_ids = solution_ids + [tokenizer.eos_token_id]
        examples.append(
            Example(input_ids=prompt_ids + completion_ids, labels=[-100] * len(prompt_ids) + completion_ids)
        )
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for teacher-forced training."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# Supervised training
# ----------------------------------------------------------------------------------------------


def train_until(
    model, tokenizer, pools: dict[str, list[Example]], spec: TrainSpec, max_new_tokens: int, log: Log = print
) -> dict:
    """Supervised training on ``pools`` (one task per batch, round robin over the tasks still being
    trained) until every task's greedy dev accuracy reaches ``spec.target_acc`` (checked every
    ``spec.eval_every`` steps from ``spec.first_eval``) or ``spec.max_steps``.

    With ``spec.stop_each_task`` a task leaves the mix once it reaches the target, and the model ends
    at the evaluated state closest to the target (smallest worst-task distance), so a fast learner is
    parked near the target instead of overshooting. Returns the steps and dev accuracies kept."""
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    tasks = {name: get_task(name) for name in pools}
    dev = held_out_items(tasks, spec.eval_items, DEV_SEED)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def dev_accuracy() -> dict[str, float]:
        return greedy_accuracy(model, tokenizer, tasks, dev, max_new_tokens=max_new_tokens, limits=WORLD_LIMITS)

    active, step = sorted(pools), 0
    accuracy = dev_accuracy() if spec.stop_each_task else {name: 0.0 for name in pools}
    best = (_distance(accuracy, spec.target_acc), 0, accuracy, copy.deepcopy(model.state_dict()))
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    while step < spec.max_steps and active:
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(
                step, warmup_steps=spec.warmup_steps, total_steps=spec.max_steps, schedule="cosine", min_lr_ratio=0.1
            )
        pool = pools[active[step % len(active)]]  # one task per batch: less padding
        batch = collate([rng.choice(pool) for _ in range(spec.batch_size)], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if (step >= spec.first_eval and step % spec.eval_every == 0) or step == spec.max_steps:
            accuracy = dev_accuracy()
            log(
                f"  step {step:4d}  loss {loss.item():.3f}  dev "
                + "  ".join(f"{n}={a:.2f}" for n, a in accuracy.items())
                + f"  {time.perf_counter() - start:.0f}s (cpu {time.process_time() - cpu_start:.0f}s)"
            )
            reached = [name for name in active if accuracy[name] >= spec.target_acc]
            if spec.stop_each_task:
                active = [name for name in active if name not in reached]
                if _distance(accuracy, spec.target_acc) < best[0]:
                    best = (_distance(accuracy, spec.target_acc), step, accuracy, copy.deepcopy(model.state_dict()))
            elif len(reached) == len(active):
                active = []
        elif step % 100 == 0:
            log(f"  step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    kept_step = step
    if spec.stop_each_task:
        _, kept_step, accuracy, state = best
        model.load_state_dict(state)
    model.eval()
    return {
        "steps": step,
        "kept_step": kept_step,
        "dev_accuracy": accuracy,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }


def _distance(accuracy: dict[str, float], target: float) -> float:
    """The worst task's distance to ``target``."""
    return max(abs(acc - target) for acc in accuracy.values())


# ----------------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------------


def perturb_first_layer(model, noise: float, seed: int) -> None:
    """Add Gaussian noise of ``noise`` standard deviations (each matrix's own) to the weight matrices of the
    first decoder layer of ``model``, in place, from a generator seeded with ``seed``."""
    if noise <= 0:
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (p for p in model.model.layers[0].parameters() if p.dim() == 2):
            weight.add_(torch.randn(weight.shape, generator=generator) * (weight.std() * noise))


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _fit_and_save(model, tokenizer, pools, train_spec: TrainSpec, spec: WorldSpec, out: Path, log: Log) -> dict:
    """Train ``model`` by ``train_spec`` on ``pools``, report its held-out accuracy on their tasks, save it to
    ``out``; the summary."""
    fit = train_until(model, tokenizer, pools, train_spec, spec.max_new_tokens, log)
    tasks = {name: get_task(name) for name in pools}
    held_out = greedy_accuracy(
        model,
        tokenizer,
        tasks,
        held_out_items(tasks, spec.eval_items, 0),
        max_new_tokens=spec.max_new_tokens,
        limits=WORLD_LIMITS,
    )
    log("  held-out greedy accuracy " + "  ".join(f"{n}={a:.3f}" for n, a in held_out.items()))
    _save(model, tokenizer, out)
    return {
        **fit,
        "eval_accuracy": held_out,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
    }


def build_world(paths: WorldPaths, spec: WorldSpec = DEFAULT_SPEC, log: Log = print, threads: int = 1) -> dict:
    """Train tokenizer, teacher and student from scratch and save them under ``paths``.

    Uses ``threads`` torch CPU threads (one is fastest for models this small, and by far the fastest
    on a busy machine). Writes into a temporary sibling directory and renames it at the end, so an
    interrupted build never leaves a half-written world behind. Returns the summary also saved as
    ``world.json``."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build_world(paths, spec, log)
    finally:
        torch.set_num_threads(previous_threads)


def _build_world(paths: WorldPaths, spec: WorldSpec, log: Log) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started, cpu_started = time.perf_counter(), time.process_time()
    tmp = paths.root.with_name(paths.root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    staging = world_paths(tmp)
    log(f"building the demo world in {paths.root} (tokenizer, teacher, student; a few minutes on a CPU)")
    tokenizer = train_tokenizer(world_texts(spec.tasks, spec.tokenizer_items), spec.vocab_size)
    tokenizer.save_pretrained(staging.tokenizer)
    pools = {name: encode_task(tokenizer, name, get_task(name).items("train", spec.train_pool)) for name in spec.tasks}
    summary: dict = {"version": WORLD_VERSION, "spec": asdict(spec), "vocab_size": len(tokenizer)}
    teacher = make_model(spec.teacher, tokenizer, seed=0)
    log(
        f"training the teacher ({spec.teacher.num_layers} layers x {spec.teacher.hidden_size} wide) "
        f"to {spec.teacher_train.target_acc:.0%} dev accuracy"
    )
    summary["teacher"] = _fit_and_save(teacher, tokenizer, pools, spec.teacher_train, spec, staging.teacher, log)
    student = copy.deepcopy(teacher)
    prune_to(student, spec.student_layers, "uniform")
    perturb_first_layer(student, spec.student_noise, seed=0)
    log(
        f"training the student (teacher pruned to {spec.student_layers} layers, the first perturbed by noise "
        f"{spec.student_noise}) to about {spec.student_train.target_acc:.0%} dev accuracy"
    )
    summary["student"] = _fit_and_save(student, tokenizer, pools, spec.student_train, spec, staging.student, log)
    summary["build_seconds"] = round(time.perf_counter() - started, 1)
    summary["build_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    summary["torch_threads"] = torch.get_num_threads()
    staging.info.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(paths.root, ignore_errors=True)
    tmp.rename(paths.root)
    log(f"world built in {summary['build_seconds']:.0f}s")
    return summary


def world_ready(paths: WorldPaths) -> bool:
    return paths.info.exists() and (paths.teacher / "config.json").exists() and (paths.student / "config.json").exists()


def ensure_world(
    root: Path | None = None, spec: WorldSpec = DEFAULT_SPEC, rebuild: bool = False, log: Log = print, threads: int = 1
) -> WorldPaths:
    """The cached world's paths, building it first when it is missing (or ``rebuild``)."""
    paths = world_paths(root)
    if rebuild or not world_ready(paths):
        build_world(paths, spec, log, threads)
    return paths


def load_world_info(paths: WorldPaths) -> dict:
    return json.loads(paths.info.read_text())


WORLD_PREFIX = "world:"  # `student.model: world:student` names the cached world's models


def uses_world_models(train: dict[str, Any]) -> bool:
    """Whether a train config dict names a ``world:`` model."""
    return any(str(train.get(role, {}).get("model", "")).startswith(WORLD_PREFIX) for role in ("student", "teacher"))


def resolve_world_models(train: dict[str, Any], world_root: Path | None = None) -> dict[str, Any]:
    """Replace ``world:teacher`` / ``world:student`` model names by the cached world's directories."""
    train = copy.deepcopy(train)
    roles = [
        role for role in ("student", "teacher") if str(train.get(role, {}).get("model", "")).startswith(WORLD_PREFIX)
    ]
    if roles:
        paths = ensure_world(world_root)
        for role in roles:
            train[role]["model"] = str(getattr(paths, train[role]["model"][len(WORLD_PREFIX) :]))
    return train


# ----------------------------------------------------------------------------------------------
# A teacher with another tokenizer (cross-tokenizer distillation, docs/results/cross_tokenizer.md)
# ----------------------------------------------------------------------------------------------

CROSS_TOKENIZER_DIR = WORLD_VERSION + "-xtok"  # next to the world in the cache: teacher/ and world.json


def train_word_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer whose pre-tokens are runs of non-space characters with their leading space
    (" 6.", ' {"name":'), so its merges cross the world tokenizer's punctuation boundaries: the same texts in
    another vocabulary, with tokens that span several of the world tokenizer's, and a tokenization that looks
    ahead to the next space (and, for runs of spaces, GPT-2's whitespace lookahead)."""
    from tokenizers import Regex, pre_tokenizers

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\S+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return train_tokenizer(texts, vocab_size, pre_tokenizer)


def cross_tokenizer_teacher_dir(root: Path | None = None) -> Path:
    """Where the world's teacher with another tokenizer lives: ``$OPDPLUS_CACHE/world-v2-xtok/teacher``."""
    return (Path(root) if root is not None else cache_root() / CROSS_TOKENIZER_DIR) / "teacher"


def ensure_cross_tokenizer_teacher(
    root: Path | None = None, spec: WorldSpec = DEFAULT_SPEC, log: Log = print, threads: int = 1
) -> Path:
    """The directory of a world teacher over ``train_word_tokenizer``'s vocabulary (merges across the world
    tokenizer's punctuation), trained from scratch on the same data by the same recipe as the world's
    teacher (``spec.teacher_train``); built when missing. Pair it with the world's student (``ensure_world``)."""
    out = cross_tokenizer_teacher_dir(root)
    if (out / "config.json").exists():
        return out
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        log(f"building a world teacher with another tokenizer in {out} (a few minutes on a CPU)")
        # single-turn tasks only: multi-turn rollouts with a cross-tokenizer teacher are a config error
        tasks = tuple(name for name in spec.tasks if not is_multi_turn(get_task(name)))
        tokenizer = train_word_tokenizer(world_texts(tasks, spec.tokenizer_items), spec.vocab_size)
        pools = {name: encode_examples(tokenizer, get_task(name).items("train", spec.train_pool)) for name in tasks}
        teacher = make_model(spec.teacher, tokenizer, seed=0)
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        summary = {
            "version": CROSS_TOKENIZER_DIR,
            "vocab_size": len(tokenizer),
            "teacher": _fit_and_save(teacher, tokenizer, pools, spec.teacher_train, spec, staging, log),
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / "world.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        log(f"teacher with another tokenizer built in {summary['build_seconds']:.0f}s")
        return out
    finally:
        torch.set_num_threads(previous_threads)
