"""Client metadata follows one rule whether it comes with a session or a batch."""

from __future__ import annotations

import pytest

from domain.batch_models import ItemKind
from domain.batches import BatchPolicy, BatchSubmission, ItemInput, validate_submission
from domain.errors import InvalidArgument
from domain.sessions import metadata_violations


@pytest.mark.parametrize(
    ("metadata", "detail"),
    [
        ({"": "v"}, "key must be 1 to 128 characters"),
        ({"k" * 129: "v"}, "key must be 1 to 128 characters"),
        ({"k": "v" * 1025}, "value exceeds 1024 characters"),
    ],
)
def test_a_batch_names_the_metadata_entry_and_its_problem_as_a_session_does(
    metadata: dict[str, str], detail: str
) -> None:
    item = ItemInput(custom_id="a", kind=ItemKind.LLM_QUERY, content="hello")
    with pytest.raises(InvalidArgument) as error:
        validate_submission(BatchSubmission(items=[item], metadata=metadata), BatchPolicy())
    key = next(iter(metadata))
    assert [(v.field, v.description) for v in error.value.violations] == [
        (f"metadata[{key!r}]", detail)
    ]
    assert error.value.violations == metadata_violations(metadata)
