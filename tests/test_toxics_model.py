"""The toxic model (toxics.py): validation, defaults, JSON shape, and the
Proxy's list of a listener's toxics before it serves."""

import pytest

from fastproxy import ConfigError, Proxy, Toxic, ToxicError, UnknownNameError, toxic
from fastproxy.toxics import ATTRIBUTES, KINDS


def test_defaults_follow_toxiproxy():
    t = toxic("latency")
    assert (t.stream, t.toxicity, t.name) == ("downstream", 1.0, "latency_downstream")
    assert dict(t.attributes) == {"latency": 0, "jitter": 0}
    for kind in KINDS:
        assert set(toxic(kind).attributes) == set(ATTRIBUTES[kind])


def test_json_round_trip():
    t = toxic("slicer", "upstream", toxicity=0.5, name="s", average_size=10, size_variation=3, delay=50)
    obj = t.to_json()
    assert obj == {"name": "s", "type": "slicer", "stream": "upstream", "toxicity": 0.5,
                   "attributes": {"average_size": 10, "size_variation": 3, "delay": 50}}
    assert Toxic.from_json(obj) == t
    assert Toxic.from_json({"type": "bandwidth", "attributes": {"rate": 100.0}}).attributes["rate"] == 100


@pytest.mark.parametrize("make, field", [
    (lambda: toxic("lag"), "type"),
    (lambda: toxic("latency", "sideways"), "stream"),
    (lambda: toxic("latency", toxicity=1.5), "toxicity"),
    (lambda: toxic("latency", toxicity=True), "toxicity"),
    (lambda: toxic("latency", latency=-1), "attributes.latency"),
    (lambda: toxic("latency", latency=1.5), "attributes.latency"),
    (lambda: toxic("latency", rate=1), "attributes.rate"),
    (lambda: toxic("latency", name=" x"), "name"),
    (lambda: toxic("slicer", average_size=2, size_variation=3), "attributes.size_variation"),
    (lambda: Toxic.from_json({"type": "latency", "colour": 1}), "colour"),
    (lambda: Toxic.from_json({"stream": "upstream"}), "type"),
    (lambda: Toxic.from_json([]), "toxic"),
])
def test_bad_toxics_name_the_field(make, field):
    with pytest.raises(ToxicError) as info:
        make()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert info.value.field == field
    assert "\n" not in str(info.value) and str(info.value).startswith(field + ":")


def test_the_list_before_start():
    proxy = Proxy(listen="127.0.0.1:0", upstreams=["127.0.0.1:9"])
    a = proxy.add_toxic(toxic("latency", latency=10))
    b = proxy.add_toxic(toxic("bandwidth", "upstream", rate=5))
    assert proxy.toxics() == [a, b]
    with pytest.raises(ToxicError):
        proxy.add_toxic(toxic("latency", latency=99))
    changed = proxy.update_toxic("latency_downstream", toxicity=0.5, jitter=2)
    assert dict(changed.attributes) == {"latency": 10, "jitter": 2} and changed.toxicity == 0.5
    with pytest.raises(UnknownNameError):
        proxy.update_toxic("nope", latency=1)
    with pytest.raises(ToxicError):
        proxy.update_toxic("latency_downstream", rate=1)
    proxy.remove_toxic("latency_downstream")
    assert proxy.toxics() == [b]
    with pytest.raises(UnknownNameError):
        proxy.remove_toxic("latency_downstream")
    with pytest.raises(UnknownNameError):
        proxy.toxics(listener="elsewhere")
    with pytest.raises(ToxicError):
        proxy.set_toxics([b, b])
    proxy.set_toxics([])
    assert proxy.toxics() == []
