"""The shared test harness: every test module imports from here, never from another.

- `factories`: test data, written through the service's own code paths;
- `answers`: the exact JSON the contract promises, and the assertion that compares with it;
- `oracle`: what events add up to, computed independently of the service's SQL;
- `apps`: fixtures of an app that fails on purpose or has no database;
- `servers`: free ports, the live-server harness, SIGKILL to a postmaster;
- `database`: the Alembic configuration the fixtures migrate with;
- `faults`: the database-restart scenario, its own embedded database and its report;
- `faultrun`: `python -m tests.support.faultrun`, the scenario at a heavier load;
- `replica`: a hot standby of an embedded PostgreSQL (real streaming replication).
"""
