from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from unkey_deploy.core import config, errors, ids


def test_ids_are_prefixed_sortable_and_checked() -> None:
    a = ids.new_deployment_id()
    b = ids.new_deployment_id()
    assert a.startswith("dep_") and len(a) == 30
    assert a != b
    assert ids.is_id(a, "dep") and not ids.is_id(a, "cust")
    with pytest.raises(errors.InvalidInput):
        ids.parse_id("dep_../../etc", "dep")


def test_error_round_trips_through_wire_form() -> None:
    err = errors.ValidationFailed(
        "bad body", [errors.Problem(loc="resources.cpu", msg="must be > 0")], suggestion="fix it"
    )
    back = errors.from_dict(err.to_dict())
    assert isinstance(back, errors.ValidationFailed)
    assert back.problems[0].loc == "resources.cpu"
    assert back.exit_code == 2 and back.suggestion == "fix it"
    rl = errors.from_dict(
        errors.RateLimited("slow down", retry_after=2.5).to_dict() | {"retry_after": 2.5}
    )
    assert isinstance(rl, errors.RateLimited) and rl.retryable and rl.retry_after == 2.5


def test_config_rejects_unknown_keys_and_reads_env(tmp_path: Path) -> None:
    f = tmp_path / "unkey.toml"
    f.write_text("[gateway]\nport = 9000\nbogus = 1\n")
    with pytest.raises(errors.ValidationFailed) as exc:
        config.load(f)
    assert any(p.loc == "gateway.bogus" for p in exc.value.problems)
    s = config.load(environ={"UNKEY_GATEWAY__PORT": "9443", "UNKEY_DATA_DIR": str(tmp_path)})
    assert s.gateway.port == 9443 and s.data_dir == tmp_path
    with pytest.raises(pydantic.ValidationError):
        s.gateway.port = 1  # type: ignore[misc]


def test_every_service_reads_the_config_file_named_in_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "unkey.toml"
    f.write_text('[gateway]\nport = 9000\n[metald]\ndriver = "sandbox"\n')
    env = {"UNKEY_CONFIG_FILE": str(f), "UNKEY_GATEWAY__PORT": "9443"}
    s = config.load(environ=env)
    assert s.metald.driver == "sandbox"  # from the file
    assert s.gateway.port == 9443  # the environment overrides the file
    with pytest.raises(errors.ValidationFailed) as exc:
        config.load(environ={"UNKEY_CONFIG_FILE": str(tmp_path / "missing.toml")})
    assert "missing.toml" in exc.value.message


def test_network_lists_read_from_toml_and_env_and_name_a_bad_entry(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[metald]\negress_allow = ["10.0.0.53"]\nguest_dns = ["10.0.0.53"]\n')
    s = config.load(f)
    assert s.metald.egress_allow == ["10.0.0.53/32"] and s.metald.guest_dns == ["10.0.0.53"]
    assert "169.254.0.0/16" in s.metald.egress_deny  # the cloud metadata address, by default
    s = config.load(
        environ={"UNKEY_METALD__EGRESS_DENY": "", "UNKEY_METALD__GUEST_DNS": "::1, 9.9.9.9"}
    )
    assert s.metald.egress_deny == [] and s.metald.guest_dns == ["::1", "9.9.9.9"]
    assert config.load(environ={}).metald.guest_dns is None  # None: the host's own
    with pytest.raises(errors.ValidationFailed) as exc:
        config.load(environ={"UNKEY_METALD__EGRESS_DENY": "10.0.0.0/8,10.0.0.300/32"})
    assert exc.value.problems[0].loc == "metald.egress_deny"
    assert "'10.0.0.300/32' is not a network" in exc.value.problems[0].msg


@pytest.mark.parametrize(
    ("subnet", "says"),
    [("172.31.5.0/19", "host bits set"), ("10.0.0.0/8", "/16 to /28"), ("fd00::/64", "IPv4"),
     ("nope", "not an IPv4 network")],
)  # fmt: skip
def test_a_bad_metald_subnet_is_named_at_load(subnet: str, says: str) -> None:
    """Before, any string was taken, and metald failed later, at its start or first VM."""
    with pytest.raises(errors.ValidationFailed) as exc:
        config.load(environ={"UNKEY_METALD__SUBNET": subnet})
    assert exc.value.problems[0].loc == "metald.subnet"
    assert says in exc.value.problems[0].msg
    assert (
        config.load(environ={"UNKEY_METALD__SUBNET": "10.9.0.0/16"}).metald.subnet == "10.9.0.0/16"
    )


@pytest.mark.parametrize(
    ("var", "value", "loc"),
    [("UNKEY_METERING__BATCH_SAMPLES", "65537", "metering.batch_samples"),
     ("UNKEY_METERING__INTERVAL_MS", "1000", "metering.interval_ms")],
)  # fmt: skip
def test_metering_settings_that_would_bill_nothing_are_named_at_load(
    var: str, value: str, loc: str
) -> None:
    """A batch over the format's 65,536 samples is undecodable, and samples 1 s or more apart
    are gaps (BILLING.md): either would quarantine usage instead of billing it."""
    with pytest.raises(errors.ValidationFailed) as exc:
        config.load(environ={var: value})
    assert exc.value.problems[0].loc == loc
