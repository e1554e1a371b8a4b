"""Train a VishwamAI MoE language model: the project's main job.

    vishwam-train                      # `small` MoE preset on the built-in corpus, a few minutes on CPU
    vishwam-train --preset tiny --steps 50 --name smoke
    vishwam-train --data 'texts/*.txt' --steps 2000 --batch 32 --lr 6e-4 --mesh data=-1
    vishwam-train --teacher runs/small --set hidden_size=128 --set num_layers=2   # distil

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
(vishwam-train-tokenizer) and pass `--tokenizer`, so that hosts do not race to
write it. To try it on one machine: `python -m vishwam.launch -n 2 --cpu-devices 4 --
vishwam-train --preset tiny --mesh data=2,expert=4` (see vishwam/launch.py).

JAX's persistent compilation cache lives in $VISHWAM_JAX_CACHE (default
~/.cache/vishwam-jax; set it empty to turn it off), so a second run compiles in seconds.
"""

import argparse
import codecs
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

from vishwam.cli import add_debug_flag, run_script
from vishwam.commands._train_run import DEFAULT_PRESET as DEFAULT_PRESET
from vishwam.commands._train_run import MIN_TOKENIZER_VOCAB as MIN_TOKENIZER_VOCAB
from vishwam.commands._train_run import (_base_configs, _init_dir, _initial_model, _saved_data, _saved_section,
                                         _saved_value, _tokenizer)
from vishwam.errors import InvalidValueError

# The main job: sized for a few minutes on a 2-core CPU with the loss clearly falling.
MAIN_JOB = {"steps": 250, "batch_size": 8, "seq_len": 128, "learning_rate": 2e-3, "warmup_steps": 25,
            "eval_every": 50, "checkpoint_every": 100}
DEFAULT_VAL_FRACTION = 0.05
# The config fields that flags set (field -> argparse dest); the configs validate them, and
# their errors about one of these fields are reported with the flag and its value.
TRAIN_FLAGS = {"total_steps": "steps", "batch_size": "batch", "seq_len": "seq_len", "accum_steps": "accum",
               "learning_rate": "lr", "warmup_steps": "warmup", "seed": "seed", "nan_policy": "nan_policy",
               "distill_alpha": "distill_alpha", "distill_temperature": "distill_temperature",
               "lr_schedule": "lr_schedule", "decay_fraction": "decay_fraction", "trainable": "trainable",
               "frozen": "frozen"}
RUN_FLAGS = {"max_steps": "max_steps", "eval_every": "eval_every", "eval_batches": "eval_batches",
             "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep", "log_every": "log_every",
             "profile_steps": "profile"}
# Run settings a resumed run keeps from its config.json unless the flag is given again
# (the values of a new run: MAIN_JOB's, else RunConfig's defaults).
KEPT_ON_RESUME = {"eval_every": MAIN_JOB["eval_every"], "eval_batches": None,
                  "checkpoint_every": MAIN_JOB["checkpoint_every"], "keep_checkpoints": 3, "log_every": 10,
                  "mesh": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("model and data")
    base = what.add_mutually_exclusive_group()
    base.add_argument("--preset", help=f"ModelConfig preset: tiny, small, seed (default {DEFAULT_PRESET})")
    base.add_argument("--config", type=Path,
                      help="JSON with 'model' and/or 'train' sections (a run's config.json works), or a ModelConfig")
    base.add_argument("--init-from", type=Path, metavar="PIPELINE_DIR",
                      help="start from this pipeline's weights (vishwam-upcycle's output, a run's pipeline/): its "
                      "config.json is the model config and its tokenizer the default; --set may change only how "
                      "the weights run (dispatch, capacity, losses, remat), not their shapes")
    what.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a ModelConfig field, parsed with the field's type (true/false, none), "
                      "e.g. --set num_layers=2 --set tie_embeddings=false; repeatable")
    what.add_argument("--data", nargs="+", metavar="PATH", help="text/.jsonl/.parquet/.csv files or globs, or "
                      "one directory from vishwam-prepare-data (its tokenizer is the default) "
                      "(default: the built-in corpus, vishwam.data.default_corpus())")
    what.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the run's, trained if missing)")
    what.add_argument("--vocab-size", type=int, help="vocabulary of a newly trained tokenizer (default: the preset's)")
    what.add_argument("--separator", metavar="TEXT",
                      help="split text files into documents at TEXT (escapes allowed, e.g. '\\n\\n' or "
                      "'<|endoftext|>'; default: one document per text file)")
    what.add_argument("--val-fraction", type=float,
                      help="fraction of documents held out for validation (default 0.05; a resumed run keeps its own)")
    train = p.add_argument_group("optimisation (TrainConfig)")
    train.add_argument("--steps", type=int, help=f"optimiser steps (schedule length; default {MAIN_JOB['steps']})")
    train.add_argument("--batch", type=int, help=f"global batch in sequences (default {MAIN_JOB['batch_size']})")
    train.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {MAIN_JOB['seq_len']})")
    train.add_argument("--accum", type=int, help="micro-batches per step (gradient accumulation; default 1)")
    train.add_argument("--lr", type=float, help=f"peak learning rate (default {MAIN_JOB['learning_rate']})")
    train.add_argument("--warmup", type=int, help=f"warm-up steps (default {MAIN_JOB['warmup_steps']}, at most a "
                       "tenth of --steps)")
    train.add_argument("--lr-schedule", choices=["cosine", "wsd", "linear", "constant"],
                       help="learning rate after the warm-up (default cosine; wsd: stable, then a linear decay "
                       "over the last --decay-fraction of the steps)")
    train.add_argument("--decay-fraction", type=float, help="wsd: fraction of the steps spent decaying (default 0.2)")
    train.add_argument("--seed", type=int, help="seed of the init, the data order and the step keys (default 0)")
    train.add_argument("--trainable", metavar="REGEX",
                       help="train only parameters whose dotted path matches, e.g. 'mlp\\.(router|experts)'")
    train.add_argument("--frozen", metavar="REGEX", help="do not train parameters whose path matches, e.g. '^embed$'")
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
    run.add_argument("--eval-every", type=int, help=f"evaluate every N steps (default {MAIN_JOB['eval_every']}; "
                     "a resumed run keeps its own unless given)")
    run.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    run.add_argument("--checkpoint-every", type=int, help=f"save every N steps (default "
                     f"{MAIN_JOB['checkpoint_every']}; a resumed run keeps its own unless given)")
    run.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    run.add_argument("--log-every", type=int, help="progress-bar refresh interval in steps (default 10)")
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
            raise InvalidValueError(f"{', '.join(missing)} missing: --coordinator, --num-processes and --process-id go "
                                    "together (or pass --distributed alone to auto-detect the cluster).")
        if not 0 <= args.process_id < args.num_processes:
            raise InvalidValueError(f"--process-id {args.process_id} is not in [0, --num-processes {args.num_processes}).")
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
            raise InvalidValueError(f"--mesh {text!r}: expected AXIS=SIZE pairs such as data=2,expert=4")
    return sizes


def _parse_profile(text: str) -> tuple[int, int]:
    """`START:STOP` as two numbers; `RunConfig` checks the window itself."""
    start, sep, stop = text.partition(":")
    try:
        window = (int(start), int(stop)) if sep else None
    except ValueError:
        window = None
    if window is None:
        raise InvalidValueError(f"--profile {text!r}: expected START:STOP, two step numbers (e.g. 2:4 traces steps 2 to 4)")
    return window


@contextlib.contextmanager
def _flag_errors(args):
    """Within: a `TrainConfig`/`RunConfig` `ValueError` about a field a flag set names that flag first."""
    try:
        yield
    except ValueError as error:
        found = re.search(r"\b(TrainConfig|RunConfig)\.(\w+)", str(error))
        flags = TRAIN_FLAGS if found and found[1] == "TrainConfig" else RUN_FLAGS
        dest = flags.get(found[2]) if found else None
        value = None if dest is None else getattr(args, dest)
        if value is None:
            raise
        raise InvalidValueError(f"--{dest.replace('_', '-')} {value!r}: {error}") from error


def _check_args(args) -> None:
    """What the flags alone get wrong (those the configs do not check), refused before anything
    is built or read."""
    if args.vocab_size is not None and args.vocab_size < 1:
        raise InvalidValueError(f"--vocab-size {args.vocab_size}: must be a positive integer.")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise InvalidValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1) (0 = no validation).")
    for flag, path, kind in (("--config", args.config, "file"), ("--tokenizer", args.tokenizer, "directory"),
                             ("--teacher", args.teacher, "directory"), ("--init-from", args.init_from, "directory")):
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            raise FileNotFoundError(f"{flag} {path}: no such {kind}.")
    if args.init_from is not None and not (_init_dir(args.init_from) / "model.safetensors").is_file():
        raise FileNotFoundError(f"--init-from {args.init_from}: no pipeline there (model.safetensors, config.json, "
                                "tokenizer/); pass a directory written by vishwam-upcycle or VishwamAIPipeline.save.")
    if args.mesh is not None:
        _parse_mesh(args.mesh)
    if args.profile is not None:
        _parse_profile(args.profile)
    if args.separator is not None:
        _parse_separator(args.separator)


def _parse_separator(text: str) -> str:
    """`--separator` with backslash escapes read (`'\\n\\n'` is two newlines)."""
    try:
        separator = codecs.decode(text, "unicode_escape")
    except UnicodeDecodeError as error:
        raise InvalidValueError(f"--separator {text!r}: not a valid escaped string ({error.reason}).") from None
    if not separator:
        raise InvalidValueError("--separator '': an empty separator cannot split documents; drop the flag for one "
                                "document per file.")
    return separator


def _run_settings(args, run_dir: Path, resuming: bool) -> dict:
    """RunConfig fields kept across a resume: the flag when given, else the run's saved value,
    else a new run's default."""
    flags = {"eval_every": args.eval_every, "eval_batches": args.eval_batches,
             "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep, "log_every": args.log_every,
             "mesh": None if args.mesh is None else _parse_mesh(args.mesh)}
    saved = _saved_section(run_dir, "run") if resuming else {}
    return {field: flags[field] if flags[field] is not None else saved.get(field, default)
            for field, default in KEPT_ON_RESUME.items()}


def main(argv: list[str] | None = None, *, callbacks=(), own_process: bool = False) -> int:
    """Run the CLI; `callbacks` go to `VishwamAITrainer` (embedding the job in a program that
    watches its events: `callback(kind, step, detail)`); `own_process`: this process runs
    nothing else (then malloc may be tuned for it). Returns the exit code (`vishwam.cli`)."""
    return run_script(lambda arguments: _main(arguments, callbacks, own_process), argv)


def _resume_hint(error, run_dir: Path, args) -> str:
    """The refusal of a resume in the flags' terms."""
    given = {f"train.{field}": f"--{dest.replace('_', '-')}" for field, dest in TRAIN_FLAGS.items()
             if getattr(args, dest) is not None}
    base = "--preset/--config" if args.preset or args.config else "--set/--tokenizer/--teacher"
    lines = [f"  {field}: checkpoint={a!r}, now={b!r} (from {given.get(field, base)})"
             for field, (a, b) in error.diff.items()]
    return (f"cannot resume {run_dir}: {len(lines)} setting(s) differ from its checkpoint's, and they change what "
            "the steps compute:\n" + "\n".join(lines) + "\nDrop those flags to continue the run as it was (its config.json is the base of a resume without "
            "--preset/--config; run settings such as --eval-every, --checkpoint-every and --max-steps may change), "
            "start over with --new, or train under another --name.")


def _main(argv: list[str], callbacks, own_process: bool = False) -> int:
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    _check_args(args)
    if own_process and os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # XLA:CPU frees and reallocates its step buffers every step: let malloc keep them (no page
        # faults per step), set before JAX starts its threads. Measured to help on CPU only (on a
        # GPU/TPU host it would only keep host memory at its peak); `vishwam.cli` pins the CPU
        # platform when no accelerator is present.
        from vishwam.memory import keep_host_memory

        keep_host_memory()
    from vishwam.compile_cache import enable_compile_cache

    enable_compile_cache()
    import jax

    _init_distributed(args)

    from vishwam.config import ModelConfig, TrainConfig
    from vishwam.data import as_source, is_prepared, load_prepared, make_datasets
    from vishwam.model import abstract_model
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.train._placement import Placement
    from vishwam.train.checkpoint import IncompatibleConfigError
    from vishwam.train.run_config import RunConfig, check_seq_len
    from vishwam.train.trainer import VishwamAITrainer, check_resume, compatibility_config


    if args.name:
        name = args.name
    elif args.teacher is not None:
        name = f"{args.teacher.absolute().name}-student"
    elif args.init_from is not None:
        name = _init_dir(args.init_from).absolute().name
    else:
        name = args.preset or (args.config.stem if args.config else DEFAULT_PRESET)
    run_dir = (args.run_dir or args.runs / name).absolute()
    model_dict, train_dict, origin = _base_configs(args, run_dir)
    set_fields = dict(ModelConfig.parse_override(item) for item in args.set)
    model_dict.update(set_fields)
    resuming = (run_dir / "config.json").exists() and not args.new
    if resuming and args.init_from is None and args.config is None and not args.preset:
        # A run started from weights restarts from them until it has a checkpoint (then the checkpoint wins).
        started_from = _saved_value(run_dir, "init_from")
        if isinstance(started_from, str) and Path(started_from).is_dir():
            args.init_from = Path(started_from)
    saved_source, saved_separator, saved_fraction = _saved_data(run_dir) if resuming else (None, None, None)
    source = list(args.data) if args.data is not None else saved_source
    val_fraction = next(v for v in (args.val_fraction, saved_fraction, DEFAULT_VAL_FRACTION) if v is not None)
    # The run's own separator when its data is read again, unless the flag says otherwise.
    separator = _parse_separator(args.separator) if args.separator is not None else (
        saved_separator if source == saved_source else None)
    prepared = source is not None and len(source) == 1 and is_prepared(source[0])
    if prepared and args.tokenizer is None and (Path(source[0]) / "tokenizer").is_dir():
        args.tokenizer = Path(source[0]) / "tokenizer"

    overrides = {field: getattr(args, dest) for field, dest in TRAIN_FLAGS.items()}
    if not train_dict:  # a preset: the main job's optimisation settings
        total = args.steps or MAIN_JOB["steps"]
        train_dict = {"batch_size": MAIN_JOB["batch_size"], "seq_len": MAIN_JOB["seq_len"],
                      "learning_rate": MAIN_JOB["learning_rate"], "total_steps": total,
                      # inside a short schedule too (e.g. --steps 20)
                      "warmup_steps": max(0, min(MAIN_JOB["warmup_steps"], total // 10))}
    # Everything the configs get wrong is refused here, before a tokenizer is trained or data read
    # (the vocabulary is the tokenizer's; any valid size stands in for it until then).
    with _flag_errors(args):
        train_config = TrainConfig.from_dict({**train_dict, **{k: v for k, v in overrides.items() if v is not None}})
        provisional = ModelConfig.from_dict({**model_dict, "vocab_size": int(model_dict.get("vocab_size") or 1)})
        check_seq_len(provisional, train_config)
        run_config = RunConfig(
            run_dir=str(run_dir), max_steps=args.max_steps, **_run_settings(args, run_dir, resuming),
            resume="require" if args.resume else "never" if args.new else "auto",
            on_db_locked="fallback" if args.db_fallback else "raise", progress=not args.no_progress,
            profile_steps=None if args.profile is None else _parse_profile(args.profile))
        run_config.check_profile_window(run_config.last_step(train_config))
        # The devices and the mesh, checked before a tokenizer or a token cache is written.
        Placement(run_config.mesh, provisional, train_config)
    if args.resume and not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoints/ to resume from; "
                                "drop --resume to start the run.")
    text = as_source(source, separator=separator) if source is not None and not prepared else as_source(None)

    teacher, teacher_tokenizer = None, None
    if args.teacher is not None:
        from vishwam.model_dirs import load_model_dir

        # A run, a pipeline or an HF checkpoint; without --tokenizer the student trains with
        # the teacher's own tokenizer, so the ids line up.
        teacher, teacher_pipeline = load_model_dir(args.teacher)
        if teacher_pipeline is None:
            raise InvalidValueError(f"--teacher {args.teacher}: the teacher has no tokenizer; pass a run with "
                                    "tokenizer/, a pipeline or an HF checkpoint with its tokenizer files.")
        teacher_tokenizer = teacher_pipeline.tokenizer
    if teacher_tokenizer is not None and args.tokenizer is None:
        tokenizer, tok_origin = teacher_tokenizer, f"{args.teacher / 'tokenizer'} (the teacher's)"
    elif args.init_from is not None and args.tokenizer is None:
        from vishwam.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(_init_dir(args.init_from) / "tokenizer")
        tok_origin = f"{_init_dir(args.init_from) / 'tokenizer'} (the initial weights')"
    else:
        tokenizer, tok_origin = _tokenizer(args, run_dir, text, int(model_dict.get("vocab_size") or 0),
                                           exact="vocab_size" in set_fields)
    vocab = int(tokenizer.vocab_size)
    if "vocab_size" in set_fields and set_fields["vocab_size"] != vocab:
        raise InvalidValueError(f"--set vocab_size={set_fields['vocab_size']}: the tokenizer ({tok_origin}) has "
                                f"{vocab} pieces, and the model's vocabulary must match it; drop --set vocab_size "
                                "(use --vocab-size N to train a tokenizer of N pieces).")
    # Existing weights (--init-from's, or the checkpoint of a run resumed from its own config.json)
    # fix the vocabulary; the tokenizer must fit in it.
    if args.init_from is not None or (resuming and args.config is None and not args.preset):
        if vocab > int(model_dict["vocab_size"]):
            raise InvalidValueError(f"the tokenizer ({tok_origin}) has {vocab} pieces, more than the model's "
                                    f"vocab_size={model_dict['vocab_size']}; use the model's own tokenizer.")
    else:
        if model_dict.get("vocab_size") not in (None, vocab):
            tok_origin += f"; its vocabulary ({vocab}) replaces the config's vocab_size={model_dict['vocab_size']}"
        model_dict["vocab_size"] = vocab
    model_config = ModelConfig.from_dict(model_dict)
    initial = _initial_model(args, model_config)

    if resuming:
        # A resume the checkpoint refuses is refused before any data is read or cached.
        try:
            check_resume(run_dir, compatibility_config(abstract_model(model_config), train_config, tokenizer, teacher))
        except IncompatibleConfigError as error:
            raise IncompatibleConfigError(_resume_hint(error, run_dir, args), error.diff) from None

    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"run:       {run_dir}")
    say(f"config:    {origin}; {model_config.num_layers} layers x {model_config.hidden_size}, "
        f"{model_config.num_experts} experts (top-{model_config.experts_per_token}), vocab {model_config.vocab_size}")
    say(f"tokenizer: {tok_origin}")
    cache_dir = run_dir.parent / ".cache" / "tokens"
    data = load_prepared(source[0], tokenizer) if prepared else text
    if jax.process_count() > 1 and not prepared:
        # Process 0 tokenises into the shared cache; the others then memory-map it (their rows only).
        from jax.experimental import multihost_utils

        from vishwam.data import tokenize_source

        if jax.process_index() == 0:
            tokenize_source(text, tokenizer, cache_dir=cache_dir)
        multihost_utils.sync_global_devices("vishwam: token cache written")
    train_iter, val_iter = make_datasets(tokenizer, data, seq_len=train_config.seq_len,
                                         batch_size=train_config.batch_size, val_fraction=val_fraction,
                                         seed=train_config.seed, cache_dir=cache_dir)
    try:
        say(f"data:      {'built-in corpus' if source is None else ' '.join(source)}: "
            f"{train_iter.rows.num_tokens:,} train tokens, "
            f"{0 if val_iter is None else val_iter.rows.num_tokens:,} validation tokens")
        # Abstract unless --init-from: the trainer creates the parameters in their shardings from the seed.
        pipeline = VishwamAIPipeline(initial, tokenizer)
        trainer = VishwamAITrainer(
            pipeline, train_config, train_iter, val_iter, run=run_config, teacher=teacher, callbacks=callbacks,
            extra_config={"data": {"source": "default corpus" if source is None else source,
                                   "separator": separator, "val_fraction": val_fraction},
                          "teacher_run": None if args.teacher is None else str(args.teacher.absolute()),
                          "init_from": None if args.init_from is None else str(_init_dir(args.init_from).absolute())})
        try:
            result = trainer.train()
        except IncompatibleConfigError as error:
            raise IncompatibleConfigError(_resume_hint(error, run_dir, args), error.diff) from None
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
    say(f"  metrics:       {result.metrics_path}   (vishwam-report {run_dir})")
    say(f"  checkpoints:   {run_dir / 'checkpoints'} (latest step {result.checkpoint_step})")
    say(f"  tokenizer:     {run_dir / 'tokenizer'}")
    say(f"  config:        {run_dir / 'config.json'}")
    if result.pipeline_path is not None:
        say(f"  pipeline:      {result.pipeline_path}   (VishwamAIPipeline.load(...)(\"prompt\"))")
    if result.stop_reason.startswith("SIG"):
        say("Stopped by a signal after a final checkpoint; rerun the same command to resume.")
        return 128 + int(getattr(signal, result.stop_reason))
    return 0


def entry() -> None:
    """The `vishwam-train` console command."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    entry()
