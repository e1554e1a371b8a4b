"""Train a VishwamAI MoE language model: the project's main job.

    python scripts/train.py                      # `small` MoE preset on the built-in corpus, a few minutes on CPU
    python scripts/train.py --preset tiny --steps 50 --name smoke
    python scripts/train.py --data 'texts/*.txt' --steps 2000 --batch 32 --lr 6e-4 --mesh data=-1
    python scripts/train.py --teacher runs/small --set hidden_size=128 --set num_layers=2   # distil

Writes `runs/<name>/`: `metrics.duckdb` (DuckDB: runs, metrics, events), `checkpoints/`
(orbax, the latest few), `tokenizer/` (trained on the data first if none is given),
`config.json`, `profile/` with `--profile START:STOP` (a jax.profiler trace of those
steps), and at the end `pipeline/` (`VishwamAIPipeline.load(...)`).

Running the same command again resumes from the latest checkpoint (the run's
`config.json` is the base, so flags you do not repeat keep their values; a flag
that changes the model or the optimiser is refused with the list of differing
fields). `--new` starts over, `--resume` insists on a checkpoint. SIGTERM or
Ctrl-C writes a checkpoint and exits with 128 + the signal number. Exit codes
(`vishwam.cli`): 0 done, 2 bad input (configuration, flags, files; database held by
another process), 3 diverged (NaN), 128 + N stopped by signal N. An error is one
`error: ...` line and a hint; `--debug` shows the traceback instead. Bad input never
leaves a run directory behind: the run's files are written once training starts.

Several hosts: start the same command on every host with `--distributed` (JAX
finds the coordinator on TPU pods / SLURM), or with `--coordinator HOST:PORT
--num-processes N --process-id I` (defaults: $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES, $JAX_PROCESS_ID), and a mesh over all devices, e.g.
`--mesh data=-1,expert=8`; only process 0 writes the database and logs, every
process writes its shards of each checkpoint. Train the tokenizer first
(scripts/train_tokenizer.py) and pass `--tokenizer`, so that hosts do not race to
write it. To try it on one machine: `python -m vishwam.launch -n 2 --cpu-devices 4 --
scripts/train.py --preset tiny --mesh data=2,expert=4` (see vishwam/launch.py).

JAX's persistent compilation cache lives in $VISHWAM_JAX_CACHE (default
~/.cache/vishwam-jax; set it empty to turn it off), so a second run compiles in seconds.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.files import read_json_object

DEFAULT_PRESET = "small"
# The main job: sized for a few minutes on a 2-core CPU with the loss clearly falling.
MAIN_JOB = {"steps": 250, "batch_size": 8, "seq_len": 128, "learning_rate": 2e-3, "warmup_steps": 25,
            "eval_every": 50, "checkpoint_every": 100}
MIN_TOKENIZER_VOCAB = 512  # 256 byte-fallback pieces + 4 specials need room for real pieces


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("model and data")
    base = what.add_mutually_exclusive_group()
    base.add_argument("--preset", help=f"ModelConfig preset: tiny, small, seed (default {DEFAULT_PRESET})")
    base.add_argument("--config", type=Path,
                      help="JSON with 'model' and/or 'train' sections (a run's config.json works), or a ModelConfig")
    what.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a ModelConfig field, parsed with the field's type (true/false, none), "
                      "e.g. --set num_layers=2 --set tie_embeddings=false; repeatable")
    what.add_argument("--data", nargs="+", metavar="PATH", help="text/.jsonl/.parquet/.csv files or globs, or "
                      "one directory from scripts/prepare_data.py (its tokenizer is the default) "
                      "(default: the built-in corpus, vishwam.data.default_corpus())")
    what.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the run's, trained if missing)")
    what.add_argument("--vocab-size", type=int, help="vocabulary of a newly trained tokenizer (default: the preset's)")
    what.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    train = p.add_argument_group("optimisation (TrainConfig)")
    train.add_argument("--steps", type=int, help=f"optimiser steps (schedule length; default {MAIN_JOB['steps']})")
    train.add_argument("--batch", type=int, help=f"global batch in sequences (default {MAIN_JOB['batch_size']})")
    train.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {MAIN_JOB['seq_len']})")
    train.add_argument("--accum", type=int, help="micro-batches per step (gradient accumulation)")
    train.add_argument("--lr", type=float, help=f"peak learning rate (default {MAIN_JOB['learning_rate']})")
    train.add_argument("--warmup", type=int, help="warm-up steps")
    train.add_argument("--seed", type=int, help="seed of the init, the data order and the step keys")
    train.add_argument("--nan-policy", choices=["stop", "skip"], help="on a non-finite loss: stop, or skip the step")
    train.add_argument("--teacher", type=Path, metavar="RUN_DIR", help="distil from this run's latest checkpoint, or from a HuggingFace Llama/Mistral/Qwen2/Mixtral directory")
    train.add_argument("--distill-alpha", type=float, help="weight of the data CE (rest: teacher KL)")
    train.add_argument("--distill-temperature", type=float, help="softmax temperature of the distillation KL")
    run = p.add_argument_group("run")
    run.add_argument("--name", help="run name: writes runs/<name>/ (default: the preset's name)")
    run.add_argument("--runs", type=Path, default=Path("runs"), help="parent directory of runs")
    run.add_argument("--run-dir", type=Path, help="the run directory itself (overrides --runs/--name)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    mode.add_argument("--new", action="store_true", help="delete the run's checkpoints and metrics and start over")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (default: --steps)")
    run.add_argument("--eval-every", type=int, help=f"default {MAIN_JOB['eval_every']}")
    run.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    run.add_argument("--checkpoint-every", type=int, help=f"default {MAIN_JOB['checkpoint_every']}")
    run.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    run.add_argument("--log-every", type=int, default=10, help="progress-bar refresh interval in steps")
    run.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (default: all devices on data)")
    run.add_argument("--db-fallback", action="store_true",
                     help="if another process holds metrics.duckdb, log to a separate file instead of failing")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--profile", metavar="START:STOP",
                     help="trace steps START..STOP (1-based, inclusive) with jax.profiler into <run>/profile/ "
                          "(TensorBoard profile plugin or Perfetto); those steps stay out of the throughput")
    hosts = p.add_argument_group("several processes (jax.distributed; python -m vishwam.launch sets these)")
    hosts.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() and let JAX find the cluster (Cloud TPU, SLURM, ...)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                       help="address of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS); "
                       "needs --num-processes and --process-id")
    hosts.add_argument("--num-processes", type=int, metavar="N", default=_env_int("JAX_NUM_PROCESSES"),
                       help="processes in the job (default $JAX_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=int, metavar="I", default=_env_int("JAX_PROCESS_ID"),
                       help="this process's index in [0, N) (default $JAX_PROCESS_ID)")
    add_debug_flag(p)
    return p


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _init_distributed(args) -> None:
    """`jax.distributed.initialize` from the flags: explicit with `--coordinator`, auto-detected
    with `--distributed` alone. Raises ValueError on an incomplete or impossible set."""
    import jax

    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    if all(v is None for v in explicit.values()) and not args.distributed:
        return
    if any(v is not None for v in explicit.values()):
        missing = [flag for flag, v in explicit.items() if v is None]
        if missing and not args.distributed:
            raise ValueError(f"{', '.join(missing)} missing: --coordinator, --num-processes and --process-id go "
                             "together (or pass --distributed alone to auto-detect the cluster).")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id} is not in [0, --num-processes {args.num_processes}).")
    # Cross-process collectives between CPU devices; accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE pairs such as data=2,expert=4")
    return sizes


def _parse_profile(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        window = (int(start), int(stop)) if sep else None
    except ValueError:
        window = None
    if window is None:
        raise ValueError(f"--profile {text!r}: expected START:STOP, two step numbers (e.g. 2:4 traces steps 2 to 4)")
    if not 1 <= window[0] <= window[1]:
        raise ValueError(f"--profile {text!r}: START must be at least 1 and at most STOP "
                         "(the window is steps START to STOP, counted from 1)")
    return window


def _check_args(args) -> None:
    """What the flags alone get wrong, refused before anything is built or read."""
    positive = {"--steps": args.steps, "--batch": args.batch, "--seq-len": args.seq_len, "--accum": args.accum,
                "--max-steps": args.max_steps, "--eval-batches": args.eval_batches, "--keep": args.keep,
                "--log-every": args.log_every, "--vocab-size": args.vocab_size}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer.")
    for flag, value in {"--eval-every": args.eval_every, "--checkpoint-every": args.checkpoint_every,
                        "--warmup": args.warmup}.items():
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value}: must be >= 0.")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1) (0 = no validation).")
    for flag, path, kind in (("--config", args.config, "file"), ("--tokenizer", args.tokenizer, "directory"),
                             ("--teacher", args.teacher, "directory")):
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            raise FileNotFoundError(f"{flag} {path}: no such {kind}.")
    if args.mesh is not None:
        _parse_mesh(args.mesh)
    if args.profile is not None:
        _parse_profile(args.profile)


def _enable_compile_cache() -> None:
    import jax

    cache = os.environ.get("VISHWAM_JAX_CACHE", os.path.expanduser("~/.cache/vishwam-jax"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _base_configs(args, run_dir: Path) -> tuple[dict, dict, str]:
    """Model and train dicts before CLI overrides, and where they came from."""
    from vishwam.config import PRESETS

    saved = run_dir / "config.json"
    if args.config is not None:
        data = read_json_object(args.config, what="--config")
        sectioned = "model" in data or "train" in data
        model = data.get("model", {}) if sectioned else data
        train = data.get("train", {}) if sectioned else {}
        if not isinstance(model, dict) or not isinstance(train, dict):
            raise ValueError(f"--config {args.config}: the 'model' and 'train' sections must be JSON objects.")
        return dict(model), dict(train), str(args.config)
    if saved.exists() and not args.new and not args.preset:
        data = read_json_object(saved, what="the run's")
        if not isinstance(data.get("model"), dict) or not isinstance(data.get("train"), dict):
            raise ValueError(f"{saved} has no 'model' and 'train' sections; it was not written by the trainer "
                             "(start over with --new, or choose another --run-dir).")
        return dict(data["model"]), dict(data["train"]), f"{saved} (resuming)"
    preset = args.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}.")
    return dict(PRESETS[preset]), {}, f"preset {preset!r}"


def _saved_source(run_dir: Path):
    """The data source a run was started with (its config.json), for a resume without --data."""
    try:
        source = json.loads((run_dir / "config.json").read_text()).get("data", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, list) else None


def _tokenizer(args, run_dir: Path, source, vocab_size: int, *, exact: bool = False):
    from vishwam.data import as_source
    from vishwam.tokenizer import VishwamAITokenizer

    if args.tokenizer is not None:
        return VishwamAITokenizer.from_pretrained(args.tokenizer), f"{args.tokenizer}"
    if (run_dir / "tokenizer" / "tokenizer.model").exists() and not args.new:
        return VishwamAITokenizer.from_pretrained(run_dir / "tokenizer"), f"{run_dir / 'tokenizer'}"
    start = time.perf_counter()
    documents = as_source(source).read().documents
    if not any(documents):
        raise ValueError(f"--data {' '.join(source)}: no text to train a tokenizer on (the files are empty).")
    target = args.vocab_size or (vocab_size if exact else max(vocab_size, MIN_TOKENIZER_VOCAB))
    # Trained into a scratch folder: the trainer saves it into the run once training starts,
    # so a run refused later leaves no half-made run directory behind.
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = VishwamAITokenizer.train(documents, Path(scratch) / "tokenizer.model", vocab_size=target,
                                             hard_vocab_limit=False, input_kind="documents")
    return tokenizer, (f"trained here: vocab {tokenizer.vocab_size} on {len(documents)} documents "
                       f"in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None, *, callbacks=()) -> int:
    """Run the CLI; `callbacks` go to `VishwamAITrainer` (embedding the job in a program that
    watches its events: `callback(kind, step, detail)`). Returns the exit code (`vishwam.cli`)."""
    return run_script(lambda arguments: _main(arguments, callbacks), argv)


def _main(argv: list[str], callbacks) -> int:
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    _check_args(args)
    _enable_compile_cache()
    import jax

    _init_distributed(args)

    from vishwam.config import ModelConfig, TrainConfig
    from vishwam.data import is_prepared, load_prepared, make_datasets
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.train.trainer import RunConfig, VishwamAITrainer, abstract_model, load_run_model

    if args.name:
        name = args.name
    elif args.teacher is not None:
        name = f"{args.teacher.absolute().name}-student"
    else:
        name = args.preset or (args.config.stem if args.config else DEFAULT_PRESET)
    run_dir = (args.run_dir or args.runs / name).absolute()
    model_dict, train_dict, origin = _base_configs(args, run_dir)
    set_fields = dict(ModelConfig.parse_override(item) for item in args.set)
    model_dict.update(set_fields)
    resuming = (run_dir / "config.json").exists() and not args.new
    source = list(args.data) if args.data is not None else _saved_source(run_dir) if resuming else None
    prepared = source is not None and len(source) == 1 and is_prepared(source[0])
    if prepared and args.tokenizer is None and (Path(source[0]) / "tokenizer").is_dir():
        args.tokenizer = Path(source[0]) / "tokenizer"

    overrides = {"total_steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                 "accum_steps": args.accum, "learning_rate": args.lr, "warmup_steps": args.warmup,
                 "seed": args.seed, "nan_policy": args.nan_policy, "distill_alpha": args.distill_alpha,
                 "distill_temperature": args.distill_temperature}
    if not train_dict:  # a preset: the main job's optimisation settings
        total = args.steps or MAIN_JOB["steps"]
        train_dict = {"batch_size": MAIN_JOB["batch_size"], "seq_len": MAIN_JOB["seq_len"],
                      "learning_rate": MAIN_JOB["learning_rate"], "total_steps": total,
                      # inside a short schedule too (e.g. --steps 20)
                      "warmup_steps": min(MAIN_JOB["warmup_steps"], total // 10)}
    train_config = TrainConfig.from_dict({**train_dict, **{k: v for k, v in overrides.items() if v is not None}})
    # Everything the configs get wrong is refused here, before a tokenizer is trained or data read
    # (the vocabulary is the tokenizer's; any valid size stands in for it until then).
    provisional = ModelConfig.from_dict({**model_dict, "vocab_size": int(model_dict.get("vocab_size") or 1)})
    if train_config.seq_len > provisional.max_seq_len:
        raise ValueError(f"--seq-len {train_config.seq_len} exceeds the model's max_seq_len="
                         f"{provisional.max_seq_len}; shorten it, or --set max_seq_len={train_config.seq_len}.")
    profile = None if args.profile is None else _parse_profile(args.profile)
    last_step = args.max_steps or train_config.total_steps
    if profile is not None and profile[1] > last_step:
        raise ValueError(f"--profile {args.profile!r}: step {profile[1]} is beyond the run's last step "
                         f"{last_step} (--steps/--max-steps); end the window at or before it")
    run_config = RunConfig(
        run_dir=str(run_dir), max_steps=args.max_steps,
        eval_every=args.eval_every if args.eval_every is not None else MAIN_JOB["eval_every"],
        eval_batches=args.eval_batches,
        checkpoint_every=(args.checkpoint_every if args.checkpoint_every is not None
                          else MAIN_JOB["checkpoint_every"]),
        keep_checkpoints=args.keep, log_every=args.log_every,
        resume="require" if args.resume else "never" if args.new else "auto",
        mesh=None if args.mesh is None else _parse_mesh(args.mesh),
        on_db_locked="fallback" if args.db_fallback else "raise", progress=not args.no_progress,
        profile_steps=profile)
    if args.resume and not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoints/ to resume from; "
                                "drop --resume to start the run.")

    teacher, teacher_tokenizer = None, None
    if args.teacher is not None:
        from vishwam.hf import is_hf_checkpoint, load_hf_checkpoint, load_hf_tokenizer
        from vishwam.tokenizer import VishwamAITokenizer

        if is_hf_checkpoint(args.teacher):
            # A HuggingFace Llama/Mistral/Qwen2/Mixtral directory; without --tokenizer the
            # student trains with the teacher's own tokenizer, so the ids line up.
            teacher, _ = load_hf_checkpoint(args.teacher)
            teacher_tokenizer = load_hf_tokenizer(args.teacher)
        else:
            teacher, _ = load_run_model(args.teacher)
            teacher_tokenizer = VishwamAITokenizer.from_pretrained(args.teacher / "tokenizer")
    if teacher_tokenizer is not None and args.tokenizer is None:
        tokenizer, tok_origin = teacher_tokenizer, f"{args.teacher / 'tokenizer'} (the teacher's)"
    else:
        tokenizer, tok_origin = _tokenizer(args, run_dir, source, int(model_dict.get("vocab_size") or 0),
                                           exact="vocab_size" in set_fields)
    vocab = int(tokenizer.vocab_size)
    if "vocab_size" in set_fields and set_fields["vocab_size"] != vocab:
        raise ValueError(f"--set vocab_size={set_fields['vocab_size']}: the tokenizer ({tok_origin}) has "
                         f"{vocab} pieces, and the model's vocabulary must match it; drop --set vocab_size "
                         "(use --vocab-size N to train a tokenizer of N pieces).")
    if model_dict.get("vocab_size") not in (None, vocab):
        tok_origin += f"; its vocabulary ({vocab}) replaces the config's vocab_size={model_dict['vocab_size']}"
    model_dict["vocab_size"] = vocab
    model_config = ModelConfig.from_dict(model_dict)

    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"run:       {run_dir}")
    say(f"config:    {origin}; {model_config.num_layers} layers x {model_config.hidden_size}, "
        f"{model_config.num_experts} experts (top-{model_config.experts_per_token}), vocab {model_config.vocab_size}")
    say(f"tokenizer: {tok_origin}")
    cache_dir = run_dir.parent / ".cache" / "tokens"
    data = load_prepared(source[0], tokenizer) if prepared else source
    if jax.process_count() > 1 and not prepared:
        # Process 0 tokenises into the shared cache; the others then memory-map it (their rows only).
        from jax.experimental import multihost_utils

        from vishwam.data import tokenize_source

        if jax.process_index() == 0:
            tokenize_source(source, tokenizer, cache_dir=cache_dir)
        multihost_utils.sync_global_devices("vishwam: token cache written")
    train_iter, val_iter = make_datasets(tokenizer, data, seq_len=train_config.seq_len,
                                         batch_size=train_config.batch_size, val_fraction=args.val_fraction,
                                         seed=train_config.seed, cache_dir=cache_dir)
    try:
        say(f"data:      {'built-in corpus' if source is None else ' '.join(source)}: "
            f"{train_iter.rows.num_tokens:,} train tokens, "
            f"{0 if val_iter is None else val_iter.rows.num_tokens:,} validation tokens")
        # Abstract: the trainer creates the parameters in their shardings from the seed.
        pipeline = VishwamAIPipeline(abstract_model(model_config), tokenizer)
        trainer = VishwamAITrainer(
            pipeline, train_config, train_iter, val_iter, run=run_config, teacher=teacher, callbacks=callbacks,
            extra_config={"data": {"source": "default corpus" if source is None else source,
                                   "val_fraction": args.val_fraction},
                          "teacher_run": None if args.teacher is None else str(args.teacher.absolute())})
        result = trainer.train()
    finally:
        train_iter.close()
        if val_iter is not None:
            val_iter.close()

    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    say()
    if result.start_step >= trainer.max_steps:
        say(f"Nothing to do: {run_dir} is already at step {result.step} of {trainer.max_steps} "
            "(use --new to start over, or --steps/--max-steps to go further).")
    skipped = f" ({result.skipped_steps} non-finite steps skipped)" if result.skipped_steps else ""
    say(f"validation loss: {loss(result.initial_val_loss)} at step 0 -> {loss(result.final_val_loss)} "
        f"at step {result.step}{skipped}")
    say(f"stopped by:      {result.stop_reason}; {time.perf_counter() - began:.0f} s in all")
    say(f"run directory:   {run_dir}")
    say(f"  metrics:       {result.metrics_path}   (python scripts/report.py {run_dir})")
    say(f"  checkpoints:   {run_dir / 'checkpoints'} (latest step {result.checkpoint_step})")
    say(f"  tokenizer:     {run_dir / 'tokenizer'}")
    say(f"  config:        {run_dir / 'config.json'}")
    if result.pipeline_path is not None:
        say(f"  pipeline:      {result.pipeline_path}   (VishwamAIPipeline.load(...)(\"prompt\"))")
    if result.stop_reason.startswith("SIG"):
        say("Stopped by a signal after a final checkpoint; rerun the same command to resume.")
        return 128 + int(getattr(signal, result.stop_reason))
    return 0


if __name__ == "__main__":
    # This process is ours: let malloc keep XLA:CPU's freed step buffers (no page faults per step).
    from vishwam.memory import keep_host_memory

    keep_host_memory()
    sys.exit(main())
