import numpy as np
import pytest

from decjax.sim.network import (
    GIB,
    Network,
    Placement,
    place_explicit,
    place_random,
    place_round_robin,
)

MIB = 2**20
GCP12 = ("Australia", "Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "NL", "Oregon",
         "Singapore", "Taiwan", "London")


def _write(tmp_path, text):
    path = tmp_path / "net.csv"
    path.write_text(text)
    return path


def test_gcp12_loads_twelve_symmetric_regions():
    net = Network.gcp12()
    assert net.regions == GCP12
    assert net.latency_s.shape == net.bandwidth_bytes_per_s.shape == (12, 12)
    np.testing.assert_array_equal(net.latency_s, net.latency_s.T)
    np.testing.assert_array_equal(net.bandwidth_bytes_per_s, net.bandwidth_bytes_per_s.T)
    assert net.name == "gcp12-checkfree"


def test_gcp12_same_region_link_is_1ms_2gibps():
    net = Network.gcp12()
    np.testing.assert_allclose(np.diag(net.latency_s), 1e-3)
    np.testing.assert_allclose(np.diag(net.bandwidth_bytes_per_s), 2.0 * GIB)


def test_gcp12_variants_differ_only_at_nl_london():
    checkfree = Network.gcp12(variant="checkfree")
    skippipe = Network.gcp12(variant="skippipe")
    np.testing.assert_array_equal(checkfree.latency_s, skippipe.latency_s)
    nl, london = checkfree.region_index("NL"), checkfree.region_index("London")
    diff = np.argwhere(checkfree.bandwidth_bytes_per_s != skippipe.bandwidth_bytes_per_s)
    assert sorted(map(tuple, diff.tolist())) == sorted([(nl, london), (london, nl)])
    assert checkfree.bandwidth_bytes_per_s[nl, london] / GIB == pytest.approx(0.0236816, rel=1e-5)
    assert skippipe.bandwidth_bytes_per_s[nl, london] / GIB == pytest.approx(0.000236816,
                                                                               rel=1e-5)


def test_gcp12_known_pair_transfer_time():
    net = Network.gcp12(hop_overhead_s=0.35)
    # 4 MiB over 0.00982666015625 GiB/s = (1/256) / (161/16384) s = 64/161 s.
    expected = 0.129 + 64 / 161 + 0.35
    assert net.transfer_seconds("Australia", "Belgium", 4 * MIB) == pytest.approx(expected)
    assert net.transfer_seconds("Belgium", "Australia", 4 * MIB) == pytest.approx(expected)
    assert net.transfer_seconds(0, 1, 4 * MIB) == pytest.approx(expected)
    assert net.transfer_matrix(4 * MIB)[0, 1] == pytest.approx(expected)


def test_gcp12_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        Network.gcp12(variant="gensyn")


def test_unknown_region_lists_known_ones():
    net = Network.gcp12()
    with pytest.raises(ValueError, match="'Mars'.*Australia.*London"):
        net.region_index("Mars")
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        net.transfer_seconds(0, 12, 1.0)


def test_with_overhead_and_summary():
    net = Network.gcp12().with_overhead(0.5)
    assert net.hop_overhead_s == 0.5
    assert net.transfer_seconds("LA", "LA", 0) == pytest.approx(1e-3 + 0.5)
    text = net.summary()
    assert "12 regions" in text and "ms" in text and "Mbit/s" in text
    with pytest.raises(ValueError, match="hop_overhead_s"):
        net.with_overhead(-1.0)


def test_uniform_network():
    net = Network.uniform(3, latency_ms=10.0, bandwidth_gibps=1.0, hop_overhead_s=0.1)
    assert net.regions == ("r0", "r1", "r2")
    assert net.transfer_seconds("r0", "r2", GIB) == pytest.approx(0.01 + 1.0 + 0.1)
    named = Network.uniform(["a", "b"], latency_ms=0.0, bandwidth_gibps=2.0)
    assert named.regions == ("a", "b")
    assert named.transfer_seconds("a", "b", GIB) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bandwidth_gibps"):
        Network.uniform(2, latency_ms=1.0, bandwidth_gibps=0.0)
    with pytest.raises(ValueError, match="regions"):
        Network.uniform(0, latency_ms=1.0, bandwidth_gibps=1.0)


def test_negative_and_zero_bandwidth_name_the_pair():
    lat = np.zeros((2, 2))
    bw = np.ones((2, 2))
    bw[0, 1] = -1.0
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s.*a-b"):
        Network(regions=("a", "b"), latency_s=lat, bandwidth_bytes_per_s=bw)
    bw[0, 1], bw[1, 0] = 1.0, 0.0
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s.*b-a"):
        Network(regions=("a", "b"), latency_s=lat, bandwidth_bytes_per_s=bw)


def test_invalid_network_fields():
    ok = dict(regions=("a", "b"), latency_s=np.zeros((2, 2)), bandwidth_bytes_per_s=np.ones((2, 2)))
    with pytest.raises(ValueError, match="latency_s.*square"):
        Network(**{**ok, "latency_s": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s.*square"):
        Network(**{**ok, "bandwidth_bytes_per_s": np.ones((3, 3))})
    with pytest.raises(ValueError, match="latency_s.*finite"):
        Network(**{**ok, "latency_s": np.full((2, 2), np.inf)})
    with pytest.raises(ValueError, match="latency_s.*>= 0"):
        Network(**{**ok, "latency_s": -np.ones((2, 2))})
    with pytest.raises(ValueError, match="unique"):
        Network(**{**ok, "regions": ("a", "a")})
    with pytest.raises(ValueError, match="hop_overhead_s"):
        Network(**ok, hop_overhead_s=-0.1)


def test_network_arrays_are_read_only():
    net = Network.gcp12()
    with pytest.raises(ValueError):
        net.latency_s[0, 0] = 5.0


def test_from_csv_round_trip_and_same_region(tmp_path):
    path = _write(tmp_path, "# comment\nregion_a,region_b,latency_ms,bandwidth_gibps\n"
                            "x,y,10,0.5\nx,z,20,0.25\ny,z,30,1.0\n")
    net = Network.from_csv(path, hop_overhead_s=0.2, same_region=(2.0, 4.0))
    assert net.regions == ("x", "y", "z")
    assert net.name == "net"
    assert net.transfer_seconds("z", "x", GIB) == pytest.approx(0.02 + 4.0 + 0.2)
    assert net.transfer_seconds("y", "y", GIB) == pytest.approx(0.002 + 0.25 + 0.2)


def test_from_csv_matches_gcp12():
    from importlib import resources

    data = resources.files("decjax.sim").joinpath("data").joinpath("regions_gcp12.csv")
    with resources.as_file(data) as path:
        net = Network.from_csv(path)
    ref = Network.gcp12()
    np.testing.assert_array_equal(net.latency_s, ref.latency_s)
    np.testing.assert_array_equal(net.bandwidth_bytes_per_s, ref.bandwidth_bytes_per_s)


def test_from_csv_missing_pair(tmp_path):
    path = _write(tmp_path, "region_a,region_b,latency_ms,bandwidth_gibps\nx,y,10,0.5\n"
                            "x,z,20,0.25\n")
    with pytest.raises(ValueError, match="missing pair y-z"):
        Network.from_csv(path)


def test_from_csv_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="missing column 'bandwidth_gibps'"):
        Network.from_csv(_write(tmp_path, "region_a,region_b,latency_ms\nx,y,1\n"))
    with pytest.raises(ValueError, match="x-y.*bandwidth_gibps"):
        Network.from_csv(_write(tmp_path, "region_a,region_b,latency_ms,bandwidth_gibps\n"
                                          "x,y,1,-2\n"))
    with pytest.raises(ValueError, match="x-y.*latency_ms"):
        Network.from_csv(_write(tmp_path, "region_a,region_b,latency_ms,bandwidth_gibps\n"
                                          "x,y,fast,2\n"))
    with pytest.raises(ValueError, match="twice"):
        Network.from_csv(_write(tmp_path, "region_a,region_b,latency_ms,bandwidth_gibps\n"
                                          "x,y,1,2\ny,x,3,2\n"))
    with pytest.raises(ValueError, match="path"):
        Network.from_csv(tmp_path / "absent.csv")


def test_round_robin_placement():
    net = Network.gcp12()
    p = place_round_robin(net, 14)
    assert p.n_nodes == 14
    np.testing.assert_array_equal(p.node_regions, np.arange(14) % 12)
    assert [p.region_of(k) for k in (0, 7, 11, 12, 13)] == [
        "Australia", "NL", "London", "Australia", "Belgium"]
    assert "Singapore" in p.describe()


def test_explicit_placement_and_node_transfers():
    net = Network.gcp12(hop_overhead_s=0.35)
    p = place_explicit(net, ["Australia", "Belgium", "Australia"])
    np.testing.assert_array_equal(p.node_regions, [0, 1, 0])
    assert p.transfer_seconds(1, 1, 4 * MIB) == 0.0
    assert p.transfer_seconds(0, 1, 4 * MIB) == pytest.approx(0.129 + 64 / 161 + 0.35)
    # Two nodes in one region use the same-region link: 1 ms, 2 GiB/s.
    assert p.transfer_seconds(0, 2, 4 * MIB) == pytest.approx(1e-3 + 4 / 2048 + 0.35)
    m = p.transfer_matrix(4 * MIB)
    assert m.shape == (3, 3)
    np.testing.assert_allclose(m, [[p.transfer_seconds(i, j, 4 * MIB) for j in range(3)]
                                   for i in range(3)])
    with pytest.raises(ValueError, match="Mars"):
        place_explicit(net, ["Australia", "Mars"])
    with pytest.raises(ValueError, match="region_names"):
        place_explicit(net, [])
    with pytest.raises(ValueError, match=r"node must be in \[0, 3\)"):
        p.region_of(3)


def test_random_placement_is_seeded():
    net = Network.gcp12()
    a = place_random(net, 50, seed=3)
    b = place_random(net, 50, seed=3)
    c = place_random(net, 50, seed=4)
    np.testing.assert_array_equal(a.node_regions, b.node_regions)
    assert not np.array_equal(a.node_regions, c.node_regions)
    assert a.node_regions.min() >= 0 and a.node_regions.max() < 12


@pytest.mark.parametrize("place", [
    lambda net, n: place_round_robin(net, n),
    lambda net, n: place_random(net, n, seed=0),
])
@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_node_counts(place, n):
    with pytest.raises(ValueError, match="n_nodes"):
        place(Network.gcp12(), n)


def test_invalid_placement():
    net = Network.uniform(2, latency_ms=1.0, bandwidth_gibps=1.0)
    with pytest.raises(ValueError, match="node_regions"):
        Placement(net, np.array([0, 2]))
    with pytest.raises(ValueError, match="node_regions"):
        Placement(net, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="seed"):
        place_random(net, 2, seed=-1)
