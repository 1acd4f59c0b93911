import pytest

import shoal


@pytest.fixture(scope="module")
def client():
    with shoal.Client(n_workers=2) as c:
        yield c
