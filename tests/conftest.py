import signal

import pytest

import shoal

# A suite started in the background by a shell without job control (`cmd &`
# in a script, as CI may be) inherits SIGINT ignored, as POSIX asks, and
# Python then installs no KeyboardInterrupt handler: the Ctrl-C tests
# (test_hardening, test_signals) would send signals nobody sees. They test
# what a terminal's Ctrl-C does, so the suite runs with its disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def client():
    with shoal.Client(n_workers=2) as c:
        yield c
