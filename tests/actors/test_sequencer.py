from actors.sequencer import Sequencer, Verdict


def test_in_order_and_duplicates() -> None:
    s = Sequencer(window=4)
    assert s.check(0, 0, 900)[0] is Verdict.ACCEPT
    s.accept(0, 0, 900)
    assert s.check(0, 0, 900)[0] is Verdict.DUPLICATE  # queued, not applied yet
    s.applied(0, 900)
    assert s.check(0, 0, 900)[0] is Verdict.DUPLICATE  # applied
    assert s.check(1, 1000, 1900)[0] is Verdict.ACCEPT


def test_window_and_skip() -> None:
    s = Sequencer(window=2)
    assert s.check(3, 3000, 3900)[0] is Verdict.AHEAD_OF_WINDOW
    assert s.check(2, 2000, 2900)[0] is Verdict.ACCEPT
    s.accept(2, 2000, 2900)
    s.skip()  # 0 never came
    assert s.next_seq == 1 and s.skipped_count == 1
    verdict, msg = s.check(0, 0, 900)
    assert verdict is Verdict.SKIPPED and "0" in msg
    assert s.check(3, 3000, 3900)[0] is Verdict.ACCEPT  # the window moved


def test_overlapping_timestamps_refused_against_both_neighbours() -> None:
    s = Sequencer(window=8)
    s.accept(0, 0, 900)
    s.applied(0, 900)
    s.accept(3, 3000, 3900)
    assert s.check(1, 800, 1500)[0] is Verdict.OVERLAP  # starts before batch 0 ended
    assert s.check(2, 2000, 3000)[0] is Verdict.OVERLAP  # runs into batch 3
    assert s.check(2, 2000, 2900)[0] is Verdict.ACCEPT
    s.withdraw(3)
    assert s.check(2, 2000, 3500)[0] is Verdict.ACCEPT
