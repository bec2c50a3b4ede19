"""Flag parsing for the small launch scripts (evaluate, chat, export_hf).

Each script defines its flags on its own `flags.FlagValues`, not absl's global FLAGS, so several scripts
can live in one process (tests, notebooks) and run as `script.main(script.parse(argv))`; from the
command line `app.run(main, flags_parser=parse)` does the same. absl's own flags (--verbosity, ...)
still parse into the global FLAGS.
"""

from __future__ import annotations

import sys
from typing import Sequence

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
