"""run.py --help: this project's page, whose groups are exactly conf/'s and whose commands are
README's; Hydra's own page stays at --hydra-help."""
import os
import re

import pytest

from conftest import REPO, run_cli
from octconv_exp.config.helppage import config_groups

CONF = os.path.join(REPO, "conf")


def conf_groups():
    """{group: options} from the YAML files of conf/'s group folders (not hydra/)."""
    groups = {}
    for group in sorted(os.listdir(CONF)):
        folder = os.path.join(CONF, group)
        if group != "hydra" and os.path.isdir(folder):
            groups[group] = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return groups


def listed_groups(page):
    """The groups section of a help page, as {group: options}."""
    section = page.split("== Config groups", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0]
    listed = {}
    for line in section.splitlines():
        group, options = line.split(":", 1)
        listed[group.strip()] = [o.strip() for o in options.split("(in use:")[0].split(",")]
    return listed


def readme_commands():
    """The commands of README's "The three commands you will use most", one line each."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text.split("## The three commands you will use most", 1)[1]
    block = block.split("```bash\n", 1)[1].split("```", 1)[0]
    block = re.sub(r"\\\n\s*", "", block)
    return [line.replace(".venv/bin/python", "python") for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_group_list_is_conf_s_without_the_schema_entries():
    listed = listed_groups("== Config groups ==\n" + config_groups() + "\n\n")
    assert listed == conf_groups()
    assert "cifar10_schema" not in config_groups()


@pytest.mark.slow
def test_help_lists_conf_s_groups_the_readme_commands_and_the_docs():
    res = run_cli("--help", "conv=octave")
    assert res.returncode == 0, res.stderr[-2000:]
    page = res.stdout
    assert "powered by Hydra" not in page and "_schema" not in page
    assert listed_groups(page) == conf_groups()
    assert "conv:       multi-octave, octave, vanilla   (in use: octave)" in page
    assert "(in use: none)" in page.split("experiment:", 1)[1].splitlines()[0]
    commands = readme_commands()
    assert len(commands) == 5
    for command in commands:
        assert command in page, command
    docs = re.findall(r"\b([A-Za-z]+\.md)\b", page.split("Docs:", 1)[1])
    assert "README.md" in docs and len(docs) >= 5
    for name in docs:
        assert os.path.isfile(os.path.join(REPO, name)) or os.path.isfile(
            os.path.join(REPO, "docs", name)), name


@pytest.mark.slow
def test_hydra_help_is_still_hydra_s_page():
    res = run_cli("--hydra-help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("Hydra (") and "--multirun,-m" in res.stdout
