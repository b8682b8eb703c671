"""What the driver sends to workers: settings yes, credentials only when asked."""

import json

import pytest

from griffin_batch.cluster import connect

ENV = {
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023",
    "JAX_COMPILATION_CACHE_DIR": "/tmp/jax",
    "AWS_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": "http://minio:9000",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "AWS_SESSION_TOKEN": "t0k3n",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/key.json",
    "FSSPEC_GCS_TOKEN": "anon",  # a way to authenticate, not a secret
    "FSSPEC_GCS_PROJECT": "proj",
    "FSSPEC_S3": json.dumps({"client_kwargs": {"endpoint_url": "http://x"}, "secret": "s"}),
    "FSSPEC_S3_KEY": "k",
    "HOME": "/home/me",  # not storage: never sent
}
SECRETS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FSSPEC_S3",
           "FSSPEC_S3_KEY", "GOOGLE_APPLICATION_CREDENTIALS"]


def test_credentials_stay_behind_unless_asked():
    sent = connect.forwarded_env(ENV)
    assert sorted(sent) == ["AWS_ENDPOINT_URL_S3", "AWS_REGION", "FSSPEC_GCS_PROJECT",
                            "FSSPEC_GCS_TOKEN", "JAX_COMPILATION_CACHE_DIR",
                            "STORAGE_EMULATOR_HOST"]
    assert connect.withheld_credentials(ENV) == sorted(SECRETS)
    asked = connect.forwarded_env(ENV, credentials=True)
    assert sorted(asked) == sorted([*sent, *SECRETS])


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("FSSPEC_GCS_TOKEN", "google_default", False),
    ("FSSPEC_GCS_TOKEN", "/path/to/sa.json", True),
    ("FSSPEC_GCS", json.dumps({"token": "anon", "project": "p"}), False),
    ("FSSPEC_GCS", json.dumps({"token": {"client_secret": "x"}}), True),
    ("GCSFS_DEFAULT_PROJECT", "p", False),
    ("FSSPEC_S3", "not json", False),
])
def test_what_counts_as_a_credential(name, value, secret):
    assert connect.is_credential(name, value) is secret


@pytest.mark.ray
def test_the_connection_says_which_cluster_and_that_it_asks_for_a_token(ray_address):
    conn = connect.connect(ray_address)
    text = conn.describe()
    assert text.startswith(f"joined the Ray cluster at {conn.address} (")
    assert "token authentication on" in text
