"""The family registry (model_export/families.py) is the one list of families
the trainer knows, and it is the contract's (service/contract.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import get_args

from model_export import cli_args
from model_export.families import FAMILIES, get_family
from service.contract import ModelFamily
from tests.helpers.deploy import REPO


def test_the_registry_holds_the_contracts_families() -> None:
    assert tuple(FAMILIES) == get_args(ModelFamily)
    for name in FAMILIES:
        assert get_family(name).name == name


def test_the_trainers_family_choices_and_folders_come_from_the_registry() -> None:
    ap = cli_args._common()
    family = next(a for a in ap._actions if a.dest == "family")
    assert isinstance(family, argparse.Action)
    assert sorted(family.choices or ()) == sorted(FAMILIES)
    for name, entry in FAMILIES.items():
        assert f"{name} ({entry.summary})" in (family.help or "")
    assert {e.suffix for e in FAMILIES.values()} == {"pwae", "otproto"}  # the committed models'


def test_a_family_the_contract_does_not_name_stops_the_import() -> None:
    probe = (
        "from typing import Literal\n"
        "import service.contract as c\n"
        "c.ModelFamily = Literal['pwae']\n"
        "import model_export.families\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "add or remove the family in both" in result.stderr
