"""Every query example in docs/query.md (fenced as `json query`) runs, on both databases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import Served

DOC = Path(__file__).resolve().parents[2] / "docs" / "query.md"
EXAMPLES = re.findall(r"```json query\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
async def test_doc_examples_run(served: Served, example: str) -> None:
    response = await served.query(json.loads(example))
    assert response.status_code == 200, response.text
    assert response.json()["data"], "an example should show some rows on the test data"
