import socket

import pytest

from partc.runtime.worker import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fn", "no_such_module:make"], "--fn 'no_such_module:make': No module named 'no_such_module'"),
        (["--fn", "stagefns"], "--fn 'stagefns': expected MODULE:FACTORY"),
        (["--fn", "stagefns:make", "--next", "cloud.0"], "--next 'cloud.0': expected NAME=HOST:PORT"),
        (["--fn", "stagefns:make", "--codec", "h1=int4"], "unknown codec 'int4'"),
        (["--fn", "stagefns:make", "--token-file", "/nonexistent/token"], "/nonexistent/token: cannot read"),
    ],
)
def test_bad_worker_arguments_are_reported(capsys, argv, message):
    assert main(["--stage", "edge.0", *argv]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("partc-worker: error: ") and message in err, err


def test_a_taken_port_is_reported(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        assert main(["--stage", "edge.0", "--fn", "stagefns:make", "--listen", address]) == 1
    assert f"partc-worker: error: stage 'edge.0': cannot listen on {address}" in capsys.readouterr().err
