"""Flag parsing for the small launch scripts (evaluate, chat, export_hf).

Each script defines its flags on its own `flags.FlagValues`, not absl's global FLAGS, so several scripts
can live in one process (tests, notebooks) and run as `script.main(script.parse(argv))`; from the
command line `app.run(main, flags_parser=parse)` does the same. absl's own flags (--verbosity, ...)
still parse into the global FLAGS.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence

from absl import flags

HELP = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], doc: str = "") -> list[str]:
  """Parse `argv` (program name first) into `flag_values`, every flag starting from its default;
  returns the positional arguments (program name first). Bad or unknown flags raise `flags.Error`;
  --help prints `doc` and the flags, then exits."""
  argv = list(argv)
  if any(a in HELP for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(), file=sys.stdout)
    raise SystemExit(0)
  flag_values.unparse_flags()
  rest = flag_values(argv, known_only=True)
  return flags.FLAGS(rest)


def quiet_orbax() -> None:
  """Drop orbax's INFO chatter (dozens of lines per restore) from absl's log; keep its warnings."""
  import logging as std_logging

  from absl import logging

  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)


def app_parser(flag_values: flags.FlagValues, doc: str = ""):
  """`parse` as app.run's flags_parser: a bad flag prints the error and exits with status 1 (as
  absl's own parser does) instead of a traceback."""
  def parser(argv):
    try:
      return parse(flag_values, argv, doc)
    except flags.Error as e:
      sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see help on flags.\n")
      sys.exit(1)
  return parser


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
  """Inside: a bad value, a missing file (or any of `kinds`) ends the script as one line on stderr,
  `error: ...`, exit 1. Their messages name the key or file; `-v 1` (absl's verbosity) keeps the
  traceback for a bug report."""
  try:
    yield
  except (ValueError, FileNotFoundError, FileExistsError, *kinds) as e:
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
      raise
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Scripts that read a run config (train, plan, teacher_logits): absl's global FLAGS, where
# ml_collections' config flag loads the file and applies the --config.* overrides.
# ---------------------------------------------------------------------------------------------

# What loading a config file or applying an override raises for a user's mistake; anything else
# (a NameError in a config file, say) is a bug and keeps its traceback.
CONFIG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError)


def config_app_parser(exit_code: int = 1):
  """app.run's flags_parser for those scripts: a bad flag (an unknown or misspelt config key, with
  ml_collections' suggestion; a config file that does not load; a variant its get_config refuses;
  a value of the wrong type) is one line on stderr and exit `exit_code`."""
  def parser(argv):
    try:
      return flags.FLAGS(argv)
    except CONFIG_ERRORS as e:
      sys.stderr.write(f"error: {config_error(e, argv)}\n")
      sys.exit(exit_code)
  return parser


def config_error(e: BaseException, argv: Sequence[str] = ()) -> str:
  """One line for an error of loading a config file or of a --config.* override."""
  causes = [e]
  while (nxt := causes[-1].__cause__ or causes[-1].__context__) is not None and len(causes) < 8:
    causes.append(nxt)
  missing = max((c for c in causes if isinstance(c, (KeyError, AttributeError))
                 and c.args and isinstance(c.args[0], str)), key=lambda c: len(c.args[0]),
                default=None)  # ml_collections re-raises the KeyError with its suggestion added
  if missing is not None and not isinstance(e, flags.Error):
    key, _, hint = missing.args[0].partition("\n")
    key = key.strip("'\"")
    arg = next((a for a in argv[1:] if a.startswith("--config.") and key in
                a.split("=", 1)[0].split(".")), f"--config...{key}")
    return f"{arg}: the config has no key {key!r}" + (f". {hint.strip()}" if hint else "")
  root = causes[-1]
  flag = next((line.split(": ", 1)[0][len("flag "):] for c in causes
               if (line := str(c)).startswith("flag ")), None)
  lines = [line.strip() for line in str(root).splitlines() if line.strip()]
  message = lines[-1] if lines else type(root).__name__
  if root is not e and not isinstance(root, flags.Error):
    message = f"{type(root).__name__}: {message}"
  return f"{flag}: {message}" if flag and not message.startswith(f"flag {flag}") else message
