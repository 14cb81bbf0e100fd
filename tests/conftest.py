import logging
import signal

import pytest

from tests.support import ClientProcess, ServerProcess


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak/stress runs (make test-slow)")
    config.addinivalue_line("markers", "serial: run alone, after the tests that share the CPUs "
                                       "(`make test`): it times latencies, or loads every core")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with make test-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server shared by a module's tests (each test uses its own user names).

    Its per-address limits are off: every test connects from 127.0.0.1, so
    with them on, one test's connections and failed logins would slow or
    refuse the next test's, depending on the machine's speed. Tests of the
    limits start their own server (make_server)."""
    srv = ServerProcess(tmp_path_factory.mktemp("server"),
                        "--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0")
    yield srv
    srv.stop()


@pytest.fixture
def keep_root_logging():
    """Put the root logger's handlers and level back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def make_server(tmp_path):
    """Start servers with special options; all are stopped after the test."""
    started = []

    def start(*args, **kwargs):
        srv = ServerProcess(tmp_path, *args, **kwargs)
        started.append(srv)
        return srv

    yield start
    for srv in started:  # killed, not stopped: a graceful stop is tested on its own
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


@pytest.fixture
def clients():
    """Start ``selchat connect`` processes; all are killed after the test."""
    started = []

    def start(*args, **kwargs) -> ClientProcess:
        client = ClientProcess(*args, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()
