"""The ``kpt`` command line (DESIGN §6). ``kpt --help`` lists the commands with worked examples."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kpt.errors import UserError

EXAMPLES = """\
examples:
  kpt plugins                                    list installed domain plugins
  kpt plugins check mnist                        tiny CPU dry run of a plugin's contract
  kpt train mnist --test affnist                 train MNIST, test on affNIST
  kpt train mnist train.lr=5e-4 model.depth=4    dotted overrides, cast to the declared types
  kpt train face --config my.yaml --print-config  show the merged config and exit
  kpt train mnist --resume auto                  continue the newest run of the domain exactly
  torchrun --nproc-per-node 4 -m kpt train face  DDP on 4 GPUs (train.batch_size is global)
  kpt eval mnist runs/mnist/20250101-120000/best.pt --test affnist
  kpt data get mnist                             obtain a dataset (plugin command)
  kpt predict face a.jpg b.jpg --weights runs/face/RUN/weights.safetensors
  kpt embed face photos/ --weights runs/face/RUN --out emb.npz   embeddings + file names
  kpt embed face me.jpg --weights runs/face/RUN --gallery photos/   rank a folder 1:N
  kpt predict face me.jpg --weights runs/face/RUN --gallery photos/   the same search
  kpt embed gait data/gait/0005 --weights runs/gait/RUN --out emb.npz   gait sequence embeddings
  kpt convert cvlface SRC DST                    convert official CVLface weights
  kpt plot runs/mnist/A runs/mnist/B --out cmp.png   loss / lr / eval curves of runs together
  kpt new-plugin xray                            scaffold a pip-installable plugin package
"""

TRAIN_EXAMPLES = """\
examples:
  kpt train mnist                                defaults of the plugin
  kpt train mnist --test affnist train.epochs=3  choose test sets, override keys
  kpt train face --data /data/ms1mv2 --test lfw cfp_fp
  kpt train gait --config gait3d.yaml train.amp=bf16 --out runs/gait/swin
  kpt train mnist --resume auto                  continue the newest runs/mnist/* run
  kpt train mnist --print-config                 show the merged config and exit
  kpt train face recipe=step_sgd --print-config  a preset (official recipe) and what it sets

Config precedence: engine defaults < plugin defaults < presets (--preset NAME, or chosen by a value
such as recipe=step_sgd, --data gait3d, model.name=vit_small_kprpe) < --config files < --data/--test
< key=value.
Unknown keys are errors. The run folder (--out, default runs/DOMAIN/<timestamp>) receives config.yaml,
metrics.jsonl, summary.json, last.pt, best.pt, weights.safetensors, run.log (a copy of the console
log) and curves.png. Ctrl-C (or SIGTERM) finishes the current step and saves last.pt; a second Ctrl-C
aborts at once. last.pt is also saved every train.save_every_minutes (default 10).
An --out that already holds a run is refused: pass --resume to continue it or --overwrite to
replace it. Only one process at a time can write to a run folder (it holds the lock .kpt.lock).
"""

logger = logging.getLogger(__name__)
_SUBPARSERS: dict[str, argparse.ArgumentParser] = {}


class CliError(UserError):
    """A user error: printed as ``kpt: error: ...`` with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``kpt: error:`` line (exit 2), with a did-you-mean.

    argparse would print the usage and call ``sys.exit(2)`` itself; raising :class:`CliError` lets
    :func:`main` print the same one-line form as every other user error (``--debug``: a traceback).
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        from kpt._names import did_you_mean

        hint = ""
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            hint = did_you_mean(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)))
        raise CliError(f"{self.prog}: {message}.{hint} See `{self.prog} --help`.")


def _split_overrides(args: argparse.Namespace) -> None:
    """Move ``key=value`` items swallowed by ``--test``/``--config`` (nargs='+') to the overrides."""
    for attr in ("test", "config"):
        values = getattr(args, attr, None)
        if values:
            keep = [v for v in values if "=" not in v]
            args.overrides = [v for v in values if "=" in v] + list(args.overrides)
            setattr(args, attr, keep)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kpt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Keypoint-conditioned vision transformers (KP-RPE) for any domain plugin.")
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a domain", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("domain", help="plugin name (see `kpt plugins`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--data", help="training dataset name, or a path (sets data.root)")
    p.add_argument("--test", nargs="+", metavar="NAME", help="evaluation sets (eval.test)")
    p.add_argument("--data-root", help="data root folder (data.root)")
    p.add_argument("--config", nargs="+", default=[], metavar="FILE", help="YAML config file(s)")
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="apply a preset of the plugin (repeatable; `kpt train DOMAIN --help` lists them)")
    p.add_argument("--out", help="run folder (default runs/DOMAIN/<timestamp>)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue a run from last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds (its files are deleted first)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="kpt eval DOMAIN CHECKPOINT|--weights W [--test NAME ...] "
                                   "[key=value ...] (CHECKPOINT: last.pt/best.pt, a run folder, "
                                   "its weights.safetensors or a bare model file, or other weights "
                                   "the plugin reads, e.g. face: model.onnx; or the plugin's own "
                                   "eval command)")
    p.add_argument("domain")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="checkpoint, --test, overrides")

    p = sub.add_parser("predict", help="run a trained model on inputs (plugin command)")
    p.add_argument("domain")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="passed to the plugin")

    p = sub.add_parser("embed", help="write embeddings of inputs, rank a gallery (plugin command)")
    p.add_argument("domain")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="passed to the plugin")

    p = sub.add_parser("data", help="get | prepare | validate a dataset (plugin commands)")
    p.add_argument("action", choices=["get", "prepare", "validate"])
    p.add_argument("domain", help="plugin name, or a dataset name declared by one plugin")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="passed to the plugin")

    p = sub.add_parser("plugins", help="list plugins; `kpt plugins check NAME` dry-runs one")
    p.add_argument("args", nargs="*", metavar="check NAME [key=value ...]")
    p.add_argument("--json", action="store_true", help="machine-readable listing")

    p = sub.add_parser("convert", help="convert official weights to kpt")
    p.add_argument("source_format", choices=["cvlface"])
    p.add_argument("src")
    p.add_argument("dst")

    p = sub.add_parser("plot", help="draw loss / lr / eval curves of one or more runs to a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="legend name of each run, in order (default: the folder names)")

    p = sub.add_parser("new-plugin", help="scaffold a third-party plugin package")
    p.add_argument("name", help="domain name: lowercase letters, digits, '_'")
    p.add_argument("--out", default=".", help="parent folder of the new package folder")
    _SUBPARSERS.update(sub.choices)
    return parser


# -- commands ------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from kpt.config import build_config
    from kpt.engine.checkpoint import find_resume_checkpoint, read_checkpoint_config
    from kpt.engine.progress import configure_logging
    from kpt.engine.trainer import train
    from kpt.plugin import load_plugin

    _split_overrides(args)
    plugin = load_plugin(args.domain)
    out = Path(args.out) if args.out else None
    resume = None
    base = None
    if args.resume:
        resume = find_resume_checkpoint(args.resume, out, Path("runs") / args.domain)
        if resume is None:
            print(f"kpt: nothing to resume for {args.domain}; starting a new run", file=sys.stderr)
        else:
            base = read_checkpoint_config(resume, plugin.name)
            out = out or resume.parent
    cfg = build_config(plugin, args.config, args.overrides, args.data, args.test, args.data_root,
                       base=base, presets=args.preset)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    configure_logging(args.debug, rank=int(os.environ.get("RANK", "0")))
    train(plugin, cfg, out, resume, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kpt.plugin import load_plugin

    plugin = load_plugin(args.domain)
    if "eval" in plugin.commands:
        return int(plugin.commands["eval"](list(args.rest)))
    parser = _Parser(prog=f"kpt eval {args.domain}")
    parser.add_argument("checkpoint", nargs="?",
                        help="run folder, last.pt, best.pt or weights.safetensors (or --weights)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--weights", metavar="W",
                        help="the same as CHECKPOINT; also weights the plugin reads itself "
                             "(face: an .onnx recogniser, insightface / AdaFace IResNet files)")
    parser.add_argument("--test", nargs="+")
    parser.add_argument("--data-root")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    ns = parser.parse_args(args.rest)
    ns.config = []
    if ns.checkpoint and "=" in ns.checkpoint and not Path(ns.checkpoint).exists():
        ns.overrides, ns.checkpoint = [ns.checkpoint, *ns.overrides], None  # `--weights W k=v`
    if bool(ns.checkpoint) == bool(ns.weights):
        raise CliError(f"kpt eval {args.domain}: give the weights once, as CHECKPOINT or as "
                       f"--weights W" + (" (not both)" if ns.checkpoint else ""))
    ns.checkpoint = ns.checkpoint or ns.weights
    _split_overrides(ns)
    return _evaluate_checkpoint(plugin, ns)


def _evaluate_checkpoint(plugin: object, ns: argparse.Namespace) -> int:
    import torch

    import kpt
    from kpt.config import build_config
    from kpt.engine.distributed import init_distributed
    from kpt.engine.progress import configure_logging, metric_table
    from kpt.engine.trainer import evaluate_model
    from kpt.engine.weights import (
        CheckpointError,
        apply_run_state,
        is_model_file,
        read_run_state,
        resolve_run_weights,
    )

    configure_logging()
    # a run folder, last.pt / best.pt or weights.safetensors of this plugin, or a bare model file
    # (`kpt convert` output: evaluated with the plugin's defaults and the overrides); any other
    # file goes to the plugin's own reader of foreign weights (Plugin.load_weights), if it has one
    path = resolve_run_weights(ns.checkpoint)
    foreign: CheckpointError | None = None
    try:
        ckpt = read_run_state(path, plugin.name, allow_bare=True)
    except CheckpointError as exc:
        if plugin.load_weights is None or is_model_file(path):
            raise
        foreign = exc  # raised again if the plugin does not read the file either
        ckpt = {"path": path, "plugin": None, "config": None, "step": "final"}
    cfg = build_config(plugin, overrides=ns.overrides, test=ns.test, data_root=ns.data_root,
                       base=ckpt.get("config"))
    _, device = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = None
    if foreign is not None:
        model = plugin.load_weights(path, cfg)
        if model is None:
            raise foreign
    data = plugin.build_data(cfg)
    if model is None and ckpt["plugin"] is None:  # the file itself says how to rebuild the model
        model = kpt.load_model(str(ckpt["path"]))
    elif model is None:
        model = plugin.build_model(cfg, ckpt["info"])
        apply_run_state(model, ckpt)
    metrics = evaluate_model(plugin, model.to(device), data, cfg, device)
    print(metric_table(metrics, f"{plugin.name}: {ckpt['path']} (step {ckpt['step']})"))
    if ns.json:
        from kpt.engine.progress import dump_json  # NaN (e.g. VAL@FAR n/a) as null

        Path(ns.json).write_text(dump_json(metrics, indent=2) + "\n")
    return 0




def _dispatch(domain: str, command: str, rest: Sequence[str]) -> int:
    from kpt.plugin import discover_plugins, list_plugins, load_plugin

    if command.startswith("data ") and domain not in discover_plugins():
        # `kpt data prepare gait3d ...`: a dataset name selects the plugin that declares it; the
        # plugin's command receives the dataset name first.
        owners = [e.name for e in list_plugins() if e.plugin and domain in e.plugin.datasets]
        if len(owners) == 1:
            domain, rest = owners[0], [domain, *rest]
        elif owners:  # e.g. `synthetic`: several plugins have one
            offer = [name for name in owners if command in load_plugin(name).commands] or owners
            raise CliError(f"dataset {domain!r} is declared by the plugins {', '.join(owners)}: "
                           f"name the plugin instead: "
                           + " or ".join(f"`kpt {command} {name} ...`" for name in offer))
    plugin = load_plugin(domain)
    fn = plugin.commands.get(command)
    if fn is None:
        have = ", ".join(f"`kpt {c.split()[0]} {c.split()[1]} {domain}`" if " " in c else
                         f"`kpt {c} {domain}`" for c in plugin.commands) or "none"
        raise CliError(f"plugin {domain!r} has no `{command}` command (it offers: {have})")
    return int(fn(list(rest)) or 0)


def cmd_plugins(args: argparse.Namespace) -> int:
    from kpt import registry
    from kpt.plugin import list_plugins

    if args.args:
        if args.args[0] != "check" or len(args.args) < 2:
            raise CliError("usage: kpt plugins [--json] | kpt plugins check NAME [key=value ...]")
        return _check(args.args[1], args.args[2:])
    entries = list_plugins(load=True)
    registry.load_builtin_components()
    registry.load_plugin_components()
    if args.json:
        print(json.dumps([{"name": e.name, "status": e.status, "builtin": e.builtin,
                           "package": e.package, "object": e.target, "error": e.error,
                           "description": e.plugin.description if e.plugin else "",
                           "datasets": list(e.plugin.datasets) if e.plugin else []}
                          for e in entries], indent=2))
        return 0
    width = max([len(e.name) for e in entries] + [4])
    print(f"{'name':<{width}}  {'status':<8}  {'source':<24}  description")
    for e in entries:
        source = "built-in" if e.builtin else e.package
        text = e.plugin.description if e.plugin else e.error
        if e.plugin and e.plugin.datasets:
            text += f" [datasets: {', '.join(e.plugin.datasets)}]"
        print(f"{e.name:<{width}}  {e.status:<8}  {source:<24}  {text}")
    for line in registry.CONFLICTS:
        print(f"conflict: {line}")
    return 0


def _check(name: str, overrides: Sequence[str]) -> int:
    from kpt.engine.check import check_plugin

    def report(r: object) -> None:
        print(f"  [{'ok' if r.ok else 'FAIL'}] {r.what}: {r.detail}", flush=True)

    print(f"kpt plugins check {name}")
    results = check_plugin(name, overrides, report=report)
    ok = bool(results) and all(r.ok for r in results)
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from kpt.convert import convert_cvlface

    result = convert_cvlface(args.src, args.dst)
    print(f"converted {args.src} -> {result if result is not None else args.dst}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from kpt.engine.curves import plot_curves

    if args.label and len(args.label) != len(args.runs):
        raise CliError(f"kpt plot: {len(args.label)} --label for {len(args.runs)} runs; give one "
                       "per run or none")
    print(f"wrote {plot_curves(args.runs, args.out, args.label or None)}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from kpt.plugin.scaffold import write_plugin_package

    folder = write_plugin_package(args.name, Path(args.out))
    print(f"wrote {folder}\nnext:\n  pip install -e {folder}\n  kpt plugins check {args.name}\n"
          f"  kpt train {args.name}")
    return 0


def _versions() -> str:
    import platform

    import timm
    import torch

    from kpt._version import __version__

    return (f"kpt {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
            f"python {platform.python_version()}")


def _domain_help(argv: list[str]) -> int | None:
    """``kpt train DOMAIN --help``: the generic help plus the plugin's datasets and defaults."""
    if len(argv) < 3 or argv[0] != "train" or argv[1].startswith("-") or not (
            {"-h", "--help"} & set(argv)):
        return None
    from kpt.config import PRESET_SELECTOR, build_config, plugin_presets
    from kpt.plugin import load_plugin

    _SUBPARSERS.clear()
    build_parser()
    _SUBPARSERS["train"].print_help()
    plugin = load_plugin(argv[1])
    print(f"\nplugin {plugin.name}: {plugin.description}")
    print(f"datasets: {', '.join(plugin.datasets) or 'none declared'}")
    presets = [f"{name} ({p[PRESET_SELECTOR]}={name})" if p.get(PRESET_SELECTOR) else name
               for name, p in plugin_presets(plugin).items()]
    print(f"presets: {', '.join(presets) or 'none declared'}")
    print("default config:\n" + "\n".join("  " + line
                                          for line in build_config(plugin).to_yaml().splitlines()))
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions shown as one line (bad input), not as a traceback (a bug). Imported lazily so that
    ``kpt --help`` does not import torch."""
    errors: list[type[BaseException]] = [UserError, CliError, FileNotFoundError, FileExistsError]
    for module, name in (("kpt.config", "ConfigError"), ("kpt.plugin", "PluginError"),
                         ("kpt.registry", "RegistryError"), ("kpt.engine.checkpoint", "CheckpointError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _unknown_arguments(unknown: list[str], command: str | None) -> None:
    """Raise :class:`CliError` for arguments no parser took, suggesting the closest flag."""
    from kpt._names import did_you_mean

    sub = _SUBPARSERS.get(command or "")
    flags = [*(sub._option_string_actions if sub else {}), "--debug", "--version", "--help"]
    where = f"kpt {command}" if sub else "kpt"
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is not None:
        name = flag.partition("=")[0]
        raise CliError(f"{where}: unrecognized argument {name}.{did_you_mean(name, flags)} "
                       f"See `{where} --help`.")
    raise CliError(f"{where}: unrecognized arguments: {' '.join(unknown)}. See `{where} --help`.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kpt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        logging.getLogger("kpt").setLevel(logging.ERROR)  # discovery warnings are shown as listings
    try:
        code = _domain_help(argv)
        if code is not None:
            return code
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse cannot interleave positionals with options: collect key=value here
            unknown = [e for e in extra if "=" not in e or e.startswith("-")]
            if unknown or args.command != "train":
                _unknown_arguments(unknown or extra, args.command)
            args.overrides = list(args.overrides) + extra
        if args.version:
            print(_versions())
            return 0
        handlers = {"train": cmd_train, "eval": cmd_eval, "plugins": cmd_plugins,
                    "convert": cmd_convert, "new-plugin": cmd_new_plugin, "plot": cmd_plot,
                    "predict": lambda a: _dispatch(a.domain, "predict", a.rest),
                    "embed": lambda a: _dispatch(a.domain, "embed", a.rest),
                    "data": lambda a: _dispatch(a.domain, f"data {a.action}", a.rest)}
        if args.command is None:
            build_parser().print_help()
            return 0
        return handlers[args.command](args)
    except Exception as exc:
        if debug or not isinstance(exc, _user_errors()):
            raise
        # under torchrun every rank meets the same bad input: one message, from rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"kpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # a training run stopped by a signal saved last.pt first (TrainingInterrupted carries it)
        saved = getattr(exc, "checkpoint", None)
        print("kpt: interrupted" + (f"; saved {saved} (continue with `--resume {saved}`)"
                                    if saved is not None else ""), file=sys.stderr)
        return 130
