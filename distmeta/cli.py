"""Command line: ``python launch.py`` / ``distmeta train``, ``distmeta evaluate``, ``distmeta adapt``,
``distmeta data`` and ``distmeta checkpoint``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from distmeta.config import TEST_TIME_ALGORITHM_FIELDS, ConfigError, load_config
from distmeta.data import FASHION_MNIST_DEBIAN, NOTO_DEBIAN


def _or_auto(kind: type):
    """An argparse type: a number of ``kind``, or ``auto`` (resolved against the cluster)."""

    def parse(text: str):
        return text if text == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value"
    return parse


# Convenience flags, each declared once: the config field it sets and its argparse options. Any
# field can also be set as section.key=value.
TRAIN_FLAGS = {
    "--address": ("cluster.address", {"help": "attach to a Ray cluster: auto, HOST:PORT or ray://HOST:PORT"}),
    "--num-workers": (
        "cluster.num_workers",
        {"type": _or_auto(int), "metavar": "N|auto", "help": "default: auto, the cluster's size"},
    ),
    "--gpus-per-worker": ("cluster.gpus_per_worker", {"type": _or_auto(float), "metavar": "G|auto"}),
    "--cpus-per-worker": ("cluster.cpus_per_worker", {"type": _or_auto(float), "metavar": "C|auto"}),
    "--meta-batch-size": ("train.meta_batch_size", {"type": int}),
    "--steps": ("train.steps", {"type": int}),
    "--seed": ("train.seed", {"type": int}),
    "--logdir": ("logdir", {"help": "TensorBoard and checkpoint root (default: runs)"}),
}
# Evaluation flags and the eval.* field each sets (the rest of the protocol comes from the checkpoint).
EVAL_FLAGS = {
    "--episodes": ("eval.num_tasks", {"type": int, "help": "held-out tasks (eval.num_tasks)"}),
    "--ways": (
        "eval.ways",
        {"type": int, "help": "classes per episode (other than training's: metric learners only)"},
    ),
    "--shots": (
        "eval.shots",
        {"type": int, "nargs": "+", "help": "support examples per class (meta-RL: episodes per inner step), 1+ values"},
    ),
    "--queries": ("eval.queries", {"type": int, "help": "query examples per class (per task for regression)"}),
    "--steps": ("eval.inner_steps", {"type": int, "nargs": "+", "help": "inner steps to score after, e.g. 0 1 3"}),
    "--seed": ("eval.seed", {"type": int, "help": "seed of the held-out task stream (eval.seed)"}),
    "--transductive": (
        "eval.transductive",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "batch statistics over the whole query set (default), or each query with the support set alone",
        },
    ),
}


SETTING = re.compile(r"^[a-z_]+(\.[a-z_]+)?=")  # a config setting on the command line: section.key=value, run_name=


def _split_settings(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments, the settings among them): settings are taken out before parsing, so that one
    after a flag of several values (``--steps 0 algorithm.head_init=centroid``) or an optional one
    (``--resume train.steps=40000``) is not read as its value. The value of a flag that takes exactly
    one (``--out run_name=x``) and a word that names an existing file are not settings."""
    single = {flag for flag, action in parser._option_string_actions.items() if action.nargs is None}
    words, settings = [], []
    for i, word in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in single
        (settings if SETTING.match(word) and not is_value and not Path(word).exists() else words).append(word)
    return words, settings


def _add_flags(parser: argparse.ArgumentParser, flags: dict) -> None:
    for flag, (_, options) in flags.items():
        parser.add_argument(flag, **options)


def _settings(args: argparse.Namespace, flags: dict) -> dict:
    """{config field: value} for the flags given on the command line."""
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in flags.items()}
    return {key: value for key, value in given.items() if value is not None}


def train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Meta-train on Ray. With no arguments: MAML on sinusoid regression on an embedded local Ray.",
        epilog="Any config field can be set as section.key=value, e.g. algorithm.inner_lr=0.4 train.eval_every=0",
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    _add_flags(parser, TRAIN_FLAGS)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH|latest",
        help="continue a run from its checkpoint: latest (the newest run under --logdir, or run_name=NAME), "
        "a run folder, or a checkpoint file",
    )
    parser.add_argument("--tensorboard", action="store_true", help="serve TensorBoard on the log directory")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate instead of training: the other arguments are then `distmeta evaluate`'s "
        "(--checkpoint PATH, --episodes, --ways, ...; see distmeta evaluate --help)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def evaluate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a checkpoint on held-out tasks: mean, 95%% confidence interval, median. Unset flags "
        "keep the checkpoint's own eval.* settings; the protocol used is printed with the results.",
    )
    parser.add_argument("--checkpoint", required=True, help="e.g. runs/RUN/checkpoints/best.pt or final.pt")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument(
        "--shards",
        help="score on another dataset's episodes (cross-domain transfer): a folder of shards of images of the "
        "training data's shape, e.g. data/glyphs or data/fashion_mnist",
    )
    parser.add_argument(
        "--split-scheme", help="with --shards: the scheme of its splits (default: the training one, or its only one)"
    )
    _add_flags(parser, EVAL_FLAGS)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="eval.* fields, task.shards, algorithm.finetune or algorithm.head_init",
    )
    return parser


def launch_main(argv: list[str] | None = None, prog: str = "launch.py") -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--eval-only" in argv:  # exactly `distmeta evaluate`, with its flags
        return evaluate_main([a for a in argv if a != "--eval-only"], prog=f"{prog} --eval-only")
    parser = train_parser(prog)
    argv, settings = _split_settings(parser, argv)
    args = parser.parse_intermixed_args(argv)  # key=value and flags in any order
    args.overrides += settings
    return _guard(lambda: _train(args))


def evaluate_main(argv: list[str], prog: str = "distmeta evaluate") -> int:
    parser = evaluate_parser(prog)
    argv, overrides = _split_settings(parser, argv)
    args = parser.parse_intermixed_args(argv)
    settings = _settings(args, EVAL_FLAGS)
    other = (args.shards, args.split_scheme)
    overrides = args.overrides + overrides
    return _guard(lambda: _evaluate(args.checkpoint, args.split, args.device, overrides, settings, other))


def data_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Build Arrow shards from a dataset.")
    actions = parser.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser("fetch", help="download a dataset, verify it, build shards")
    fetched = fetch.add_subparsers(dest="dataset", required=True).add_parser(
        "omniglot", help="the official Omniglot zips (md5-checked) -> 28x28 shards"
    )
    fetched.add_argument("--out", required=True, help="output folder; the zips are kept in OUT/downloads")
    fetched.add_argument("--mirror", help="base URL that serves the two zips instead of the official GitHub one")
    datasets = actions.add_parser("build", help="dataset -> shards").add_subparsers(dest="dataset", required=True)
    omniglot = datasets.add_parser("omniglot", help="the official Omniglot zips (or their folders) -> 28x28 shards")
    omniglot.add_argument("--src", required=True, help="folder holding images_background.zip and images_evaluation.zip")
    omniglot.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    fashion = datasets.add_parser("fashion-mnist", help="Fashion-MNIST's IDX files -> 28x28 shards (10 classes)")
    fashion.add_argument("--src", default=str(FASHION_MNIST_DEBIAN), help=f"default: {FASHION_MNIST_DEBIAN} (apt)")
    fashion.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    glyphs = datasets.add_parser("glyphs", help="characters of scripts Omniglot lacks, rendered -> 28x28 shards")
    glyphs.add_argument("--fonts", default=str(NOTO_DEBIAN), help=f"Noto *.ttf files (default: {NOTO_DEBIAN}, apt)")
    glyphs.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    folder = datasets.add_parser("folder", help="a class-per-folder image dataset -> shards")
    folder.add_argument("--src", required=True, help="ROOT/{train,val,test}/<class>/, or ROOT/<class>/ with --splits")
    folder.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    folder.add_argument("--image-size", type=int, required=True, help="images are resized to N x N")
    folder.add_argument("--splits", help='JSON file {"train": [classes], "val": [...], "test": [...]}')
    folder.add_argument("--channels", type=int, choices=(1, 3), help="default: 1 if every image is grayscale, else 3")
    folder.add_argument(
        "--invert",
        action="store_true",
        help="store 255 - pixel, as Omniglot's shards are (dark drawings on light become bright on dark)",
    )
    return parser


def adapt_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Adapt a meta-trained checkpoint to your own labelled images and classify new ones. Images "
        "are prepared as the checkpoint's training images were; each query image is classified with the support "
        "set alone (not transductively).",
    )
    parser.add_argument("--checkpoint", required=True, help="a classification checkpoint, e.g. zoo/NAME.pt")
    parser.add_argument("--support", required=True, help="folder of class folders: SUPPORT/<class>/<images>")
    parser.add_argument("--query", required=True, nargs="+", help="image files, or folders of them (searched whole)")
    parser.add_argument(
        "--steps",
        type=int,
        help="inner steps (MAML family, baseline; default: the most of the checkpoint's eval.inner_steps)",
    )
    parser.add_argument("--out", default="adapted", help="where predictions.csv and the adapted model go")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        help="invert your images (255 - pixel) or not; default: as the checkpoint's training images were "
        "(Omniglot: yes, its drawings are dark on light): --no-invert for bright strokes on dark",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="the baseline's test-time algorithm.head_init=centroid|zero, algorithm.finetune=head|all",
    )
    return parser


def checkpoint_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Checkpoint files.")
    actions = parser.add_subparsers(dest="action", required=True)
    convert = actions.add_parser(
        "convert", help="rewrite a checkpoint of the earlier pickle-based format (distmeta 0.1) in today's format"
    )
    convert.add_argument("paths", nargs="+", help="old checkpoints: paths or pyarrow.fs URIs")
    convert.add_argument(
        "--out",
        help="where to write the new one (one path only; default: in its place, the old file kept as NAME.pt.pickle)",
    )
    export = actions.add_parser(
        "export",
        help="the trained parameters and config alone (no optimizer state), small and checksummed, as zoo/ holds",
    )
    export.add_argument("path", help="a checkpoint, e.g. runs/<run>/checkpoints/final.pt")
    export.add_argument("--out", required=True, help="the new file, e.g. zoo/omniglot_maml_5w1s.pt")
    show = actions.add_parser(
        "show", help="what a checkpoint holds: learner, model, data, steps, the code that trained it, its score"
    )
    show.add_argument("paths", nargs="+", help="checkpoints: paths or pyarrow.fs URIs, e.g. zoo/*.pt")
    show.add_argument("--json", action="store_true", help="one JSON object per checkpoint, in a list")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train", "evaluate", "data", "checkpoint", "adapt"}
    if not argv or argv[0] not in commands:
        print(f"usage: distmeta {{{','.join(sorted(commands))}}} [options]  (distmeta COMMAND --help)", file=sys.stderr)
        return 2
    if argv[0] == "train":
        return launch_main(argv[1:], prog="distmeta train")
    if argv[0] == "data":
        args = data_parser("distmeta data").parse_args(argv[1:])
        return _guard(lambda: _build_data(args))
    if argv[0] == "adapt":
        parser = adapt_parser("distmeta adapt")
        words, settings = _split_settings(parser, argv[1:])
        args = parser.parse_intermixed_args(words)
        args.overrides += settings
        return _guard(lambda: _adapt(args))
    if argv[0] == "checkpoint":
        args = checkpoint_parser("distmeta checkpoint").parse_args(argv[1:])
        if args.action == "export":
            return _guard(lambda: _export_checkpoint(args.path, args.out))
        if args.action == "show":
            return _guard(lambda: _show_checkpoints(args.paths, args.json))
        return _guard(lambda: _convert_checkpoints(args.paths, args.out))
    return evaluate_main(argv[1:])


def _train(args: argparse.Namespace) -> int:
    from distmeta.resume import prepare_resume
    from distmeta.run import RunInterrupted, run_name
    from distmeta.train import train

    flags = _settings(args, TRAIN_FLAGS)
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's config from its checkpoint; drop --config (use key=value)")
        cfg, run_dir = prepare_resume(args.resume, args.overrides, flags)
    else:
        cfg = load_config(args.config, args.overrides, settings=flags)
        run_dir = Path(cfg.logdir) / run_name(cfg)
    server = _start_tensorboard(cfg.logdir) if args.tensorboard else None
    try:
        train(cfg, run_dir, resume=bool(args.resume))
    except RunInterrupted as stop:
        print(f"{stop}\n{stop.what_next}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if server:
        # launch.py once did not exit 30 s after a Ctrl-C here, twice in CI on a loaded machine
        # (cause not pinned down). So: the handlers before the line that invites Ctrl-C (a test sends
        # it on reading the line), and a wait that wakes each second: Python runs a handler only on
        # the main thread, and a signal the kernel delivers to another thread does not end a
        # wait without a timeout until something else wakes the main thread.
        quit_asked = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: quit_asked.set())
        print(f"TensorBoard is still serving at {server}; press Ctrl-C to stop", flush=True)
        while not quit_asked.wait(timeout=1.0):
            pass
        # Nothing is left to close (Ray is shut down, the run's files are written): no interpreter
        # shutdown, which would wait on TensorBoard's threads.
        sys.stdout.flush()
        os._exit(0)
    return 0


def _evaluate(
    checkpoint: str, split: str, device: str, overrides: list[str], settings: dict, other=(None, None)
) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from distmeta.assemble import check_run
    from distmeta.checkpoint import load_checkpoint
    from distmeta.evaluate import check_device, evaluate, on_other_data, protocol
    from distmeta.report import format_rows
    from distmeta.resume import check_same_data
    from distmeta.rl import evaluate as meta_rl
    from distmeta.rl.local import LocalMetaRL
    from distmeta.rl.setup import MetaRLSetup, is_meta_rl
    from distmeta.runtime.monitor import write_eval_scalars

    saved, params, state = load_checkpoint(checkpoint)
    bad = [o for o in overrides if not o.startswith(("eval.", "task.shards=", *TEST_TIME_ALGORITHM_FIELDS))]
    if bad:
        raise ConfigError(
            f"evaluation overrides must be eval.* fields, task.shards=NEWPATH or the baseline's test-time "
            f"{', '.join(f.rstrip('=') for f in TEST_TIME_ALGORITHM_FIELDS)}, got {bad}"
        )
    cfg = check_run(load_config(None, overrides, settings=settings, base=saved.to_dict()))
    other_shards, scheme = other
    if scheme and not other_shards:
        raise ConfigError("--split-scheme goes with --shards (another dataset); the training data keeps its own")
    model_data = None  # the model's spec comes from the data, unless the data is another dataset's
    if other_shards:
        if is_meta_rl(cfg):
            raise ConfigError("--shards: a meta-RL checkpoint is scored on its environment, not on image shards")
        cfg, model_data = on_other_data(cfg, params.size, other_shards, split, scheme)
        cfg = check_run(cfg)
    else:
        check_same_data(saved, cfg)  # moved shards are accepted at their new path if they hold the same data
    check_device(device)
    path = Path(checkpoint)
    # a run's checkpoint: its TensorBoard gets the scores; any other file (an export, zoo/) gets none
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    unwritable = _unwritable(run_dir) if run_dir else "not in a run's checkpoints/ folder"
    if run_dir and unwritable:  # the evaluation itself only reads: it goes on, and says what it will not write
        print(
            f"note: {run_dir} is not writable ({unwritable}): the results are printed, no eval_only_{split} "
            "TensorBoard events are written",
            file=sys.stderr,
        )
    print(f"evaluating {path} (step {state['step']}, {cfg.algorithm.name})", flush=True)
    if is_meta_rl(cfg):
        if device != "cpu":
            raise ConfigError(f"--device {device}: meta-RL evaluates on the CPU (rollouts run in numpy)")
        line = meta_rl.protocol(cfg, split, cfg.eval.num_tasks)
        print(line, flush=True)
        group = LocalMetaRL(MetaRLSetup.of(cfg))
        rows = meta_rl.evaluate_returns(group, cfg, params, split, cfg.eval.num_tasks, progress=sys.stderr)
    else:
        line = protocol(cfg, split, cfg.eval.num_tasks)
        if other_shards:  # say so: these are not the training data's episodes
            trained_on = saved.task.shards or saved.task.source
            line += f"; on other data: {other_shards} ({cfg.task.split_scheme}/{split}), trained on {trained_on}"
        print(line, flush=True)
        rows = evaluate(cfg, params, split=split, device=device, progress=sys.stderr, model_data=model_data)
    print(format_rows(rows))
    if not unwritable:
        prefix = _eval_prefix(split, other_shards, saved, cfg, line)
        with SummaryWriter(str(run_dir)) as writer:
            write_eval_scalars(writer, state["step"], prefix, rows)
        print(f"TensorBoard: {prefix}/... in {run_dir}", file=sys.stderr)
    return 0


def _eval_prefix(split: str, other_shards: str | None, saved, cfg, protocol_line: str) -> str:
    """Where ``distmeta evaluate`` writes its scores in the run's TensorBoard: eval_only_<split> (on
    other data, eval_only_<data>_<split>), and, when the protocol is not the checkpoint's own (other
    episodes, seed, queries, steps, batch statistics, test-time settings), a short hash of the
    printed protocol, so that two protocols never share a tag at the same step."""
    import hashlib

    prefix = f"eval_only_{split}" if not other_shards else f"eval_only_{Path(other_shards).name}_{split}"
    if cfg.eval == saved.eval and cfg.algorithm == saved.algorithm:
        return prefix
    return f"{prefix}_{hashlib.sha256(protocol_line.encode()).hexdigest()[:8]}"


def _adapt(args: argparse.Namespace) -> int:
    from distmeta.adapt_files import check_out, class_folders, image_files, write_adapted, write_predictions
    from distmeta.adaptation import adapt
    from distmeta.evaluate import check_device

    check_device(args.device)
    out = Path(args.out)
    check_out(out)  # before the work: nothing earlier is overwritten
    support = class_folders(args.support)
    queries = image_files(args.query)
    images = [path for files in support.values() for path in files]
    labels = [name for name, files in support.items() for _ in files]
    print(f"adapting {args.checkpoint} to {len(support)} classes, {len(images)} support images", file=sys.stderr)
    settings = {"steps": args.steps, "device": args.device, "overrides": args.overrides, "invert": args.invert}
    predictor = adapt(args.checkpoint, images, labels, **settings)
    predictions = predictor.predict(queries)
    write_predictions(sys.stdout, queries, predictions)
    for written in write_adapted(out, predictor, args.checkpoint, queries, predictions):
        print(f"wrote {written}", file=sys.stderr)
    return 0


def _unwritable(folder: Path) -> str:
    """Why no file can be created in ``folder`` (``probe_write``), or "" if one can."""
    from distmeta.checkpoint import probe_write

    try:
        probe_write(folder)
    except OSError as err:
        return err.strerror or str(err)
    return ""


def _build_data(args: argparse.Namespace) -> int:
    from distmeta.data.fashion_mnist import build_fashion_mnist
    from distmeta.data.folder import build_folder
    from distmeta.data.glyphs import build_glyphs
    from distmeta.data.omniglot import OFFICIAL_URL, build_omniglot, fetch_omniglot
    from distmeta.data.shards import ShardError, check_new_output

    started = time.time()
    if args.action != "fetch":  # fetch keeps the Omniglot shards it built before, and says so
        check_new_output(Path(args.out))  # before minutes of decoding
    # SIGTERM (timeout, a scheduler's preemption, docker stop) unwinds like Ctrl-C, so that the
    # shards written so far are removed (write_shards) instead of left to pass for a dataset
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        if args.action == "fetch":
            path = fetch_omniglot(args.out, url=args.mirror or OFFICIAL_URL)
        elif args.dataset == "omniglot":
            path = build_omniglot(args.src, args.out)
        elif args.dataset == "fashion-mnist":
            path = build_fashion_mnist(args.src, args.out)
        elif args.dataset == "glyphs":
            path = build_glyphs(args.fonts, args.out)
        else:
            path = build_folder(args.src, args.out, args.image_size, args.splits, args.channels, args.invert)
    except OSError as err:  # a full disk, a file gone or unreadable, an --out that cannot be a folder
        where = f"{err.filename}: " if err.filename else ""
        raise ShardError(f"the build stopped, its shards removed: {where}{err.strerror or err}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{path} written in {time.time() - started:.1f} s")
    return 0


def _convert_checkpoints(paths: list[str], out: str | None) -> int:
    from distmeta.checkpoint import convert_legacy

    if out and len(paths) > 1:
        return _fail("--out names one file: convert one checkpoint with it, or leave it out to convert in place")
    for path in paths:
        written = convert_legacy(path, out)
        print(f"converted {path} -> {written}" + ("" if out else f" (the original kept as {path}.pickle)"), flush=True)
    return 0


def _export_checkpoint(path: str, out: str) -> int:
    import hashlib

    from distmeta.checkpoint import export_checkpoint, read_bytes

    written = export_checkpoint(path, out)
    data = read_bytes(written)
    print(f"exported {path} -> {written} ({len(data) / 1e6:.2f} MB, sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


def _show_checkpoints(paths: list[str], as_json: bool) -> int:
    """Each file's summary as it is read; one that cannot be read is named and the rest still shown."""
    import dataclasses
    import json

    from distmeta.checkpoint import CheckpointError
    from distmeta.checkpoint_summary import summarize

    shown, failed = [], 0
    for path in paths:
        try:
            summary = summarize(path)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if as_json:
            shown.append(dataclasses.asdict(summary))
        else:
            print("\n".join(summary.lines()), flush=True)
    if as_json:
        print(json.dumps(shown, indent=2, default=str))
    return 2 if failed else 0


def _start_tensorboard(logdir: str) -> str:
    from tensorboard import program

    Path(logdir).mkdir(parents=True, exist_ok=True)
    # The driver logs at INFO, which tells TensorBoard's data server to log every load (each 5 s)
    # into the run's console; its warnings still show.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--reload_interval", "5"])
    url = board.launch()
    print(f"TensorBoard at {url}", flush=True)
    return url


def _guard(run) -> int:
    from distmeta.data.shards import ShardError
    from distmeta.run import EvaluationFailed
    from distmeta.runtime.cluster import ClusterError
    from distmeta.runtime.supervisor import ActorLost

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run()
    except (ConfigError, ClusterError, ShardError, ActorLost, FloatingPointError, EvaluationFailed) as err:
        return _fail(str(err))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
