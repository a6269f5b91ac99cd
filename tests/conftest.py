"""The suite's shared fixtures, registered once: each lives in a module of tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.settings",
    "tests.fixtures.kafka",
    "tests.fixtures.stripe",
    "tests.fixtures.cli",
    "tests.fixtures.webhooks",
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
]
