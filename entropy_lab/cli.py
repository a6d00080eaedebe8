"""``entropy-lab``: sweep, quick, report, make-tiny, bench.

The main path of a sweep, top to bottom:
config → checkpoint → batches (prepare) → update + entropy (run_sweep) → stats + report.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entropy_lab.config import QUICK_LEARNING_RATES, QUICK_REPEATS
from entropy_lab.errors import EntropyLabError


def _add_sweep_arguments(p: argparse.ArgumentParser, quick: bool, track: bool = False) -> None:
    from entropy_lab.config import JET_OPTION

    if track:
        p.add_argument(
            "run",
            nargs="+",
            help="a run folder (RL_Practice run_*/ or training_state/, a TRL output_dir) or "
            "several checkpoint folders",
        )
    else:
        p.add_argument("--checkpoint", help="checkpoint folder (default for quick: the tiny one)")
    p.add_argument("--base-config", help="training YAML (default: the checkpoint's config.yaml)")
    p.add_argument("--base-model", help="base model folder or cached hub id for an adapter")
    p.add_argument(
        "--learning-rates",
        default=QUICK_LEARNING_RATES if quick else "1e-8,1e-7,1e-6,1e-5,1e-4",
        help="comma-separated η values",
    )
    p.add_argument("--num-repeats", type=int, default=QUICK_REPEATS if quick else 5)
    p.add_argument("--output-dir", default="entropy_results")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "fp64", "bf16"],
        help="fp32 (default), fp64 (faithful; default for quick on the tiny checkpoint), bf16",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=None, help="B_E: evaluation prompts")
    add_setting_arguments(p)
    p.add_argument(
        "--reference-model", help="KL reference of a full fine-tune (kl_beta > 0), a folder"
    )
    p.add_argument(
        "--eval-chunk-tokens", type=int, default=None, help="tokens per fp64 logits chunk"
    )
    p.add_argument("--steps", type=int, default=1, help="optimizer steps between measurements")
    p.add_argument("--reading", default="policy", choices=["policy", "conditional"])
    p.add_argument("--no-first-order", action="store_true", help="skip every jvp oracle")
    p.add_argument("--no-faithful", action="store_true", help="fp64 with the stock fp32 casts")
    p.add_argument("--jet", **JET_OPTION)
    # Before --jet: the nested jvps were on by default and these turned them off.
    p.add_argument("--no-curvature", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-third-order", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--r2-min", type=float, default=0.95, help="R² threshold of the verdict")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help=f"continue an interrupted {'track' if track else 'sweep'} in DIR",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: auto)")
    p.add_argument("--no-progress", action="store_true")


def jet_of(args: argparse.Namespace) -> int:
    """--jet, capped by the older --no-curvature (1) and --no-third-order (2)."""
    return min(args.jet, 1 if args.no_curvature else 3, 2 if args.no_third_order else 3)


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per training-setup setting (config.SETTINGS): None = not given."""
    from entropy_lab.config import SETTINGS

    group = p.add_argument_group(
        "training setup (default: the checkpoint's training config; see the printed table)"
    )
    for setting in SETTINGS:
        group.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.name.upper(),
            help=setting.help + (f" ({', '.join(setting.choices)})" if setting.choices else ""),
        )


def setting_values(namespace: Any) -> dict[str, Any]:
    """The training-setup flags given (strings; parsed and checked by the setup)."""
    from entropy_lab.config import SETTING_NAMES

    return {name: getattr(namespace, name, None) for name in SETTING_NAMES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropy-lab",
        description="Is the entropy change after one RL optimizer step linear in η?",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sweep_arguments(sub.add_parser("sweep", help="run a learning-rate sweep"), quick=False)
    _add_sweep_arguments(
        sub.add_parser("quick", help="3 η × 3 repeats (tiny checkpoint by default)"), quick=True
    )
    _add_sweep_arguments(
        sub.add_parser("track", help="the sweep at every checkpoint of a run (track.json)"),
        quick=False,
        track=True,
    )
    rep = sub.add_parser("report", help="recompute analysis.json and plots from raw_results")
    rep.add_argument("folder")
    rep.add_argument(
        "--dtype",
        choices=["fp32", "fp64", "bf16"],
        default=None,
        help="the sweep's dtype, for records written before record schema 2 that lack it",
    )
    tiny = sub.add_parser("make-tiny", help="build the built-in tiny checkpoint")
    tiny.add_argument("folder")
    tiny.add_argument("--seed", type=int, default=None)
    from entropy_lab import bench  # its flags are its own; importing it imports no torch

    bench.add_arguments(sub.add_parser("bench", help="performance benchmarks (issues #8, #23)"))
    return parser


def measurement_of(args: argparse.Namespace):
    """The measurement's own settings from the sweep's flags."""
    from entropy_lab.config import Measurement

    return Measurement(
        num_repeats=args.num_repeats,
        seed=args.seed,
        eval_size=args.eval_size,
        eval_chunk_tokens=args.eval_chunk_tokens,
        steps=args.steps,
        reading=args.reading,
        first_order=not args.no_first_order,
        faithful_fp64=not args.no_faithful,
        jet=jet_of(args),
    )


def run_sweep_command(
    args: argparse.Namespace,
    quick: bool,
    *,
    results_dir: Callable[[str], Path] | None = None,
    reuse: Any = None,
    on_setup: Callable[[Any], None] | None = None,
    resume_command: str | None = None,
) -> Path | None:
    """One sweep into a results folder. ``track`` passes where the folder goes
    (``results_dir``), a loaded checkpoint whose base to reuse, a callback that sees the
    setup, and how to resume the whole track."""
    from entropy_lab import distributed
    from entropy_lab.report import format_tables, write_report

    started = time.perf_counter()
    setup, folder = _open_sweep(args, quick, results_dir, reuse)
    if on_setup is not None:
        on_setup(setup)
    main_rank = distributed.is_main()
    if main_rank:
        _write_start(folder, setup, args)
    _measure(setup, folder, args, resume_command)
    if not main_rank:
        return None
    # What each phase cost this run (a resumed run counts only what it did itself).
    folder.write_meta({**folder.read_meta(), "costs": setup.costs.to_dict()})
    analysis = write_report(folder.path)
    print(format_tables(analysis))
    print(setup.costs.table())
    print(f"\nresults: {folder.path}  ({time.perf_counter() - started:.1f} s)")
    return folder.path


def _open_sweep(args: argparse.Namespace, quick: bool, results_dir, reuse) -> tuple[Any, Any]:
    """(setup, results folder): the config and checkpoint, then (rank 0) the setup table and
    the folder, then E. The folder is None on other ranks."""
    from entropy_lab import distributed
    from entropy_lab.config import check_num_repeats, parse_learning_rates
    from entropy_lab.memory import check_fits
    from entropy_lab.protocol import configure, memory_forecast, prepare
    from entropy_lab.store import new_results_dir

    etas = parse_learning_rates(args.learning_rates)
    check_num_repeats(args.num_repeats)  # before the (slow) checkpoint load
    if args.checkpoint is None and not quick:
        raise EntropyLabError("sweep needs --checkpoint DIR (or use `entropy-lab quick`)")
    configured = configure(
        args.checkpoint,
        etas,
        measurement=measurement_of(args),
        base_config=args.base_config,
        base_model=args.base_model,
        dtype=args.dtype,
        device=args.device,
        settings=setting_values(args),
        reference_model=args.reference_model,
        threads=args.threads,
        reuse=reuse,
    )
    # Data-parallel (torchrun): every rank measures, rank 0 alone writes and prints.
    folder = None
    main_rank = distributed.is_main()
    if main_rank:
        print(configured.training.table(), flush=True)  # before sampling: what the step will be
    # Before sampling: the predicted peak memory, refused on CUDA when it does not fit.
    forecast = memory_forecast(configured, check=False)
    if main_rank:
        print(forecast.table(), flush=True)
    check_fits(forecast, configured.cfg.device)  # before the folder: a refused run leaves none
    if main_rank:
        folder = _open_folder(
            args, configured.cfg, configured.checkpoint.metadata, results_dir or new_results_dir
        )
    try:
        return prepare(configured, forecast=forecast), folder
    except BaseException:
        if folder is not None and not args.resume and not any(folder.path.iterdir()):
            folder.path.rmdir()  # a run that never started leaves no empty results folder
        raise


def _write_start(folder, setup, args: argparse.Namespace) -> None:
    """run_meta.json, config.json and eval_batch.json, before the first point."""
    from entropy_lab import distributed
    from entropy_lab.report import default_thresholds
    from entropy_lab.store import run_meta

    # `report` re-applies exactly these thresholds, so it reproduces analysis.json.
    meta = run_meta(setup, args.device, setup.cfg.dtype, default_thresholds(r2_min=args.r2_min))
    meta["environment"]["world_size"] = distributed.world_size()
    folder.write_meta(meta)
    folder.write_config(setup.cfg.effective())
    eval_batch = setup.eval_batch.to("cpu").to_dict()
    if args.resume:
        _check_same_eval_batch(folder, eval_batch)
    folder.write_eval_batch(eval_batch)


def _measure(setup, folder, args: argparse.Namespace, resume_command: str | None) -> None:
    """Every (η, repeat) not already in the folder, each record written as it comes; an
    interrupt or an error keeps the finished points and says how to resume."""
    from entropy_lab import distributed
    from entropy_lab.protocol import run_sweep
    from entropy_lab.report import write_report

    main_rank = distributed.is_main()
    done = distributed.broadcast_from_main(folder.done_pairs() if main_rank else None)
    if done and main_rank:
        print(f"resuming {folder.path}: {len(done)} finished points kept", file=sys.stderr)
    try:
        run_sweep(
            setup,
            done=done,
            on_record=folder.write_record if main_rank else None,
            progress=main_rank and not args.no_progress,
        )
    except KeyboardInterrupt:
        if not main_rank:
            raise SystemExit(130) from None
        if folder.records():
            write_report(folder.path)
            done_note = f"partial analysis written to {folder.path}"
        else:  # nothing to analyse yet (write_report would refuse an empty folder)
            done_note = f"no point had finished in {folder.path}"
        resume = resume_command or f"entropy-lab {args.command} --resume {folder.path}"
        print(
            f"\ninterrupted: {done_note}\nresume with: {resume} (and the same other flags)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except EntropyLabError as exc:  # e.g. out of memory even at the smallest batch sizes
        if not main_rank:
            raise
        raise EntropyLabError(
            f"{exc} (finished points are kept: fix that, then "
            f"{resume_command or f'--resume {folder.path}'})"
        ) from exc


def _check_same_eval_batch(folder, eval_batch: dict[str, Any]) -> None:
    """On --resume, E is sampled again from the seed: it must be the stored E token for token,
    or the kept and the new points would measure H on different batches."""
    if not (folder.path / "eval_batch.json").is_file():
        return
    stored = folder.read_eval_batch()
    if any(stored.get(k) != eval_batch[k] for k in ("input_ids", "response_mask")):
        raise EntropyLabError(
            f"--resume {folder.path}: the evaluation batch sampled now differs from the stored "
            "eval_batch.json (another torch/transformers version or device?); "
            "resume where the sweep started, or start a new sweep"
        )


def _open_folder(args, cfg, checkpoint_meta: dict[str, Any], new_results_dir):
    from entropy_lab.store import ResultsFolder

    if not args.resume:
        return ResultsFolder(new_results_dir(args.output_dir))
    path = Path(args.resume)
    if not (path / "run_meta.json").is_file():
        raise EntropyLabError(f"--resume {path}: no run_meta.json there (not a results folder)")
    folder = ResultsFolder(path)
    meta = folder.read_meta()
    old_digest = meta.get("checkpoint", {}).get("digest")
    if old_digest != checkpoint_meta["digest"]:
        raise EntropyLabError(
            f"--resume {path}: it was measured on another checkpoint (digest {str(old_digest)[:12]}…)"
        )
    old_cfg = dict(meta.get("config", {}))
    new_cfg = cfg.effective()
    changed = [
        k
        for k in cfg.measurement_key()
        if k in old_cfg and old_cfg[k] != new_cfg[k] and k != "learning_rates"
    ]
    if changed:
        raise EntropyLabError(
            f"--resume {path}: settings differ from the interrupted run ({', '.join(changed)}); "
            "use the same flags"
        )
    return folder


def legacy_main(command: str, argv: list[str]) -> int:
    """The original scripts' flags: ``--learning-rates`` may be space-separated
    (``--learning-rates 1e-8 1e-7``) as well as comma-separated; everything else is as
    in ``entropy-lab sweep`` / ``quick``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("--learning-rates", "--learning_rates"):
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out += ["--learning-rates", ",".join(values)]
            continue
        if token.startswith("--"):  # --output_dir=a_b → --output-dir=a_b
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        out.append(token)
        i += 1
    return main([command, *out])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        if args.command in ("sweep", "quick"):
            from entropy_lab import distributed

            # Under torchrun: join the group (cuda -> cuda:LOCAL_RANK); else a no-op.
            args.device = distributed.init(args.device)
            run_sweep_command(args, quick=args.command == "quick")
            distributed.teardown()
        elif args.command == "track":
            from entropy_lab.track import run_track_command

            run_track_command(args, run_sweep_command)
        elif args.command == "report":
            from entropy_lab.report import format_tables, write_report

            folder = Path(args.folder)
            if not (folder / "raw_results.json").is_file():
                raise EntropyLabError(f"{folder}: no raw_results.json (not a results folder)")
            try:
                analysis = write_report(folder, dtype=args.dtype)
            except ValueError as exc:  # records the analysis cannot read as they are
                raise EntropyLabError(f"{folder}: {exc}") from exc
            print(format_tables(analysis))
        elif args.command == "bench":
            from entropy_lab.bench import run_bench_command

            run_bench_command(args)
        elif args.command == "make-tiny":
            from entropy_lab.tiny import TINY_SEED, build_tiny_checkpoint

            seed = TINY_SEED if args.seed is None else args.seed  # --seed 0 is a seed
            info = build_tiny_checkpoint(args.folder, seed=seed, verbose=True)
            print(
                f"tiny checkpoint in {args.folder}: greedy accuracy {info['rl_greedy_accuracy']:.3f}, "
                f"{info['trainable_parameters']} trainable / {info['total_parameters']} parameters, "
                f"built in {info['build_seconds']:.1f} s, digest {info['digest'][:16]}"
            )
    except EntropyLabError as exc:
        if args.debug:
            raise
        print(f"entropy-lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a sweep's points (loading, sampling E): nothing to keep
        if args.debug:
            raise
        print("entropy-lab: interrupted", file=sys.stderr)
        return 130
    return 0
