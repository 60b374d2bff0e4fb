"""docs/cli.md documents every flag of every `tandem` sub-command (walks the real argparse parser).

Where a flag lives: flags of a shared argument group ("engine options", "API server options") belong
in that group's section of the doc (`## Engine options`, `## API server options`); every other flag
belongs in its command's section (`## tandem serve`, `### tandem bench serve`, ...).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tandem.args import API_GROUP, ENGINE_GROUP
from tandem.cli import build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
SHARED_GROUPS = {ENGINE_GROUP: "Engine options", API_GROUP: "API server options"}


def sections(text: str) -> dict[str, str]:
    """Heading text (without #'s and backticks) -> the text up to the next heading."""
    parts = re.split(r"^#{2,4} (.+)$", text, flags=re.MULTILINE)
    return {parts[i].replace("`", "").strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # noqa: ANN201
    """(('serve',), parser), (('bench', 'serve'), parser), ... for every leaf sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from commands(child, (*path, name))


def group_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str | None:
    for group in parser._action_groups:
        if action in group._group_actions and group.title in SHARED_GROUPS:
            return group.title
    return None


def test_every_flag_of_every_command_is_documented() -> None:
    doc = sections(DOC.read_text())
    missing = []
    for path, parser in commands(build_parser()):
        title = "tandem " + " ".join(path)
        if title not in doc:
            missing.append(f"no section `## {title}`")
            continue
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            group = group_of(parser, action)
            where = SHARED_GROUPS[group] if group else title
            body = doc.get(where, "")
            names = action.option_strings or [action.dest.upper()]
            if not any(re.search(rf"`{re.escape(name)}\b", body) for name in names):
                missing.append(f"{names[0]} of `{title}` belongs in section '{where}'")
            if group and f"{SHARED_GROUPS[group]}" not in doc[title]:
                missing.append(f"section '{title}' should point to '{SHARED_GROUPS[group]}'")
    assert not sorted(set(missing)), "\n".join(sorted(set(missing)))


def test_the_checker_finds_a_missing_flag() -> None:
    parser = build_parser()
    doc = sections(DOC.read_text())
    [(_, serve)] = [(p, s) for p, s in commands(parser) if p == ("serve",)]
    fake = serve.add_argument("--surely-undocumented-flag")
    assert "--surely-undocumented-flag" in fake.option_strings
    assert "`--surely-undocumented-flag" not in doc["tandem serve"]
