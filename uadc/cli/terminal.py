"""The command line's plumbing: one ``error:`` line and exit code for a user mistake, Ctrl-C or SIGTERM;
usage errors (also as JSON under ``--json``); an option given twice with two values refused; logs to stderr."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import warnings
from typing import Any, Iterator, NoReturn

import click

from uadc.core.errors import UadcError, dependencies_checked, one_line
from uadc.core.process import interruption, stdout_failures_as_errors
from uadc.core.scoped import own_process

log = logging.getLogger("uadc")


class _Terminated(KeyboardInterrupt):   # SIGTERM (`docker stop`, a pipeline's timeout) unwinds as Ctrl-C does
    seen = False   # remembered: a library (Ray's wait) may re-raise it as a plain KeyboardInterrupt


def _on_sigterm(signum: int, frame: object) -> None:
    _Terminated.seen = True
    raise _Terminated()


@contextlib.contextmanager
def exit_on_user_error(interrupted: str = "interrupted; nothing was written for the unfinished step") -> Iterator[None]:
    """A UadcError becomes one ``error: ...`` line (on its own line) and its exit code; Ctrl-C
    (130) and SIGTERM (143) remove the unfinished step's temps and say so in one line."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with dependencies_checked():
            yield
    except UadcError as exc:
        sys.stderr.write("\n" if sys.stderr.isatty() else "")   # a progress bar may have left the cursor mid-line
        click.echo(f"{exc.line_prefix}{exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        sys.stderr.write("\n" if sys.stderr.isatty() else "")   # a progress bar may have left the cursor mid-line
        terminated, text = isinstance(exc, _Terminated) or _Terminated.seen, interruption(exc, interrupted)
        click.echo(text.replace("interrupted", "terminated (SIGTERM)") if terminated else text, err=True)
        sys.exit(143 if terminated else 130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _show_usage_error(exc: click.ClickException, file: Any = None) -> None:   # "error: ..." as every other
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        click.echo(f"{exc.ctx.get_usage()}\nTry '{exc.ctx.command_path} --help' for help.\n", err=True)
    click.echo(f"error: {exc.format_message()}", err=True)


def _refuse_repeats(cmd: click.Command, args: list[str]) -> None:
    """`--category a --category b` ran with b alone: an option given twice must say the same thing."""
    opts = {n: p for p in cmd.params if isinstance(p, click.Option) for n in (*p.opts, *p.secondary_opts)}
    seen: dict[str, tuple[str, str]] = {}
    i, end = 0, args.index("--") if "--" in args else len(args)
    while i < end:
        name, eq, value = args[i].partition("=")
        opt, i = opts.get(name), i + 1
        if opt is None:
            continue
        if not opt.is_flag and not eq:   # the next argument is its value, whatever it looks like (`--out --x`)
            value, i = " ".join(args[i:i + 1]), i + 1
        if opt.multiple or opt.count:
            continue
        value = name if opt.is_flag else value
        first, said = seen.setdefault(opt.name, (name, value))
        if said != value:
            raise click.UsageError(f"{first} and {name} both given: give one" if opt.is_flag else
                                   f"{name} given twice ({said!r}, then {value!r}): give it once")


class _Command(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeats(self, args)
        return super().parse_args(ctx, args)


class _SubGroup(click.Group):   # `uadc recipes show`: its commands are checked too
    command_class = _Command


class _Group(click.Group):
    command_class, group_class = _Command, _SubGroup

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)   # click's parser consumes the list
        with exit_on_user_error(), stdout_failures_as_errors():   # `uadc --help > /dev/full`: printed here, a traceback
            try:
                return super().parse_args(ctx, args)
            except click.ClickException as exc:   # an option before the command: `uadc --bogus train`
                self._usage_failed(ctx, given, exc)

    def invoke(self, ctx: click.Context):
        args = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
        with exit_on_user_error(), own_process(), stdout_failures_as_errors(), path_errors_named():   # uadc's process
            try:
                return super().invoke(ctx)
            except click.ClickException as exc:
                self._usage_failed(ctx, args, exc)

    def _usage_failed(self, ctx: click.Context, args: list[str], exc: click.ClickException) -> NoReturn:
        if isinstance(exc, click.NoSuchOption) and exc.ctx and exc.ctx.parent and \
                exc.option_name in ("-q", "--quiet", "-v", "--verbose"):   # `uadc doctor -q`
            root = exc.ctx.find_root().info_name or "uadc"
            rest = exc.ctx.command_path[len(root):].strip()
            prog = "python -m uadc" if "-m" in root.split() else root if re.fullmatch(r"\w[\w-]*", root) else "uadc"
            exc.message = f"{exc.message.rstrip('.')}: {exc.option_name} goes before the command, " \
                          f"{prog} {exc.option_name} {rest} ..."
        if self._json_on_stdout(ctx, args):   # a usage error too is one JSON document under --json
            from uadc.core.io import to_json
            click.echo(to_json({"error": exc.format_message(), "exit_code": exc.exit_code}), nl=False)
        if not isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):   # message: the help
            exc.show = functools.partial(_show_usage_error, exc)
        raise exc

    def _json_on_stdout(self, ctx: click.Context, args: list[str]) -> bool:
        """``--json -`` (verify, diff), or ``--json`` where it is a flag (or the command is unknown)."""
        if "--json=-" in args or any(a == "--json" and b == "-" for a, b in zip(args, args[1:])):
            return True
        cmd = self.get_command(ctx, next((a for a in args if not a.startswith("-")), ""))   # `uadc -q verify ...`
        return "--json" in args and (cmd is None or any("--json" in getattr(p, "opts", ()) and
                                                        getattr(p, "is_flag", False) for p in cmd.params))


class _LogHandler(logging.Handler):   # to stderr through tqdm.write: a record never glues onto a progress bar
    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)   # warnings read as such, as `uadc predict`'s own do
        line = f"warning: {one_line(text)}" if record.levelno == logging.WARNING else text
        try:   # tqdm is optional on an edge box's runtime-only install (there every warning was exit 2)
            from tqdm import tqdm
            tqdm.write(line, file=sys.stderr)
        except ImportError:
            print(line, file=sys.stderr)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from uadc.core.progress import set_progress
    if verbose and quiet:   # verbose won the logs, quiet the progress bars
        raise click.UsageError("-q and -v say opposite things: give one")
    root = logging.getLogger("uadc")
    root.handlers[:] = [_LogHandler()]   # its default format: the message
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    set_progress(False if quiet else None)   # None: bars only when stderr is a terminal
    if not verbose:   # a library's warning (Pillow on a damaged EXIF block) as one `warning:` line, not two raw ones
        warnings.showwarning = lambda message, *_args, **_kw: log.warning("%s", one_line(str(message)))


@contextlib.contextmanager
def path_errors_named() -> Iterator[None]:
    """A path the system cannot even look up (a part over 255 bytes, a symlink loop) given anywhere is a
    user error: it was an OSError / RuntimeError traceback, exit 1, from whichever check met it first."""
    import errno
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            raise
        name = str(exc.filename)
        raise UadcError(f"{name if len(name) <= 120 else name[:117] + '...'}: {exc.strerror}") from None
    except RuntimeError as exc:   # pathlib's resolve() on a loop (Python < 3.13)
        if not str(exc).startswith("Symlink loop"):
            raise
        raise UadcError(one_line(str(exc))) from None


@contextlib.contextmanager
def _errors_as_json(out: Any, also: Any = None):
    """A user error, Ctrl-C (130) or SIGTERM (143) in the block is also one JSON document on ``out``
    (None: not) and given to ``also(message, code)``, then raised on to the usual one-line ``error:``."""
    try:
        yield
    except (UadcError, KeyboardInterrupt) as exc:
        code = getattr(exc, "exit_code", 143 if isinstance(exc, _Terminated) or _Terminated.seen else 130)
        message = str(exc) or interruption(exc).replace("interrupted", "terminated (SIGTERM)" if code == 143 else "interrupted")
        if out is not None:
            from uadc.core.io import to_json
            click.echo(to_json({"error": message, "exit_code": code}), file=out, nl=False)
        if also is not None:
            also(message, code)
        raise


def json_output(f):
    """``--json``: one JSON document on stdout, the result's ``to_dict()`` (+ ``path``), or ``{"error",
    "exit_code"}`` on a user error, Ctrl-C (130) or SIGTERM (143); the usual text goes to stderr."""
    @functools.wraps(f)
    def wrapper(*args, as_json: bool = False, **kwargs):
        if not as_json:
            sys.exit(getattr(f(*args, **kwargs), "exit_code", 0))
        from uadc.core.io import to_json
        from uadc.core.process import stdout_to_stderr
        with _errors_as_json(sys.stdout), path_errors_named(), stdout_to_stderr(), \
                dependencies_checked():   # the document once fd 1 is stdout
            res = f(*args, **kwargs)
            doc = res.to_dict()
            if getattr(res, "path", None) is not None and "path" not in doc:
                doc["path"] = str(res.path)
        click.echo(to_json(doc), nl=False)
        sys.exit(getattr(res, "exit_code", 0))
    return click.option("--json", "as_json", is_flag=True,
                        help="print one JSON document (the result) on stdout; text goes to stderr")(wrapper)


class _Path(click.Path):   # "" (an unset $DIR) was Path("."): predict walked the whole working folder, wrote there
    def __init__(self, *args: Any, file: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.file = file   # a file written: `--json out/` wrote a file named `out` (pathlib drops the '/')

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value == "":
            return self.fail("an empty path", param, ctx)
        if self.file and isinstance(value, str) and value != "-" and os.path.basename(value) in ("", ".", ".."):
            return self.fail(f"{value} names a folder (it ends in '/', '.' or '..'); give a file's path", param, ctx)
        if isinstance(value, str) and value.endswith(("/", os.sep)) and os.path.isfile(value.rstrip("/" + os.sep)):
            return self.fail(f"{value} is a file, not a folder (it ends in '/')", param, ctx)   # pathlib drops it
        return super().convert(value, param, ctx)
