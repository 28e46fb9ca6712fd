"""``gpurnn``: every command, parsed by one parser and run with one error policy.

The commands of cli/commands.py, and ``study`` (cli/study.py), which drives ``train``.
"""
from . import commands, study


def build_parser():
    return commands.build_parser(extra=(study.add_parser,))


def main(argv=None):
    args = build_parser().parse_args(argv)
    return commands.run(args, {**commands.COMMANDS, "study": study.cmd_study})
