"""Every example job file in jobs/ is valid and its input passes the checks."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_file_validates(job):
    result = CliRunner().invoke(cli, ["validate", "--job", str(job)])
    assert result.exit_code == 0, result.output
    assert "rows OK" in result.stdout


def test_there_are_example_jobs():
    assert {j.name for j in JOBS} >= {"label-sentiment.yaml", "synthetic-qa.yaml", "summarise.yaml"}
