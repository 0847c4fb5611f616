import threading
import time

import pytest

from lightning_influence.trajectory.write_behind import WriteBehind, WriteThread


def test_tasks_run_in_submission_order_off_the_calling_thread():
    seen, threads = [], set()

    def task(i):
        time.sleep(0.001 * (5 - i))  # later tasks are quicker: order must still hold
        seen.append(i)
        threads.add(threading.get_ident())

    wb = WriteBehind()
    for i in range(5):
        wb.submit(task, 1, i)
    wb.drain()
    wb.close()
    assert seen == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in threads


def test_bytes_in_flight_are_bounded():
    running = threading.Semaphore(0)
    release = threading.Event()
    started = []

    def task(i):
        started.append(i)
        running.release()
        release.wait(5)

    wb = WriteBehind(limit_bytes=10)
    wb.submit(task, 8, 0)
    running.acquire()
    submitted = threading.Event()

    def second():
        wb.submit(task, 8, 1)  # 16 > 10 queued: blocks until the first finishes
        submitted.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.05)
    assert not submitted.is_set()
    release.set()
    t.join(5)
    assert submitted.is_set()
    wb.drain()
    wb.close()
    assert started == [0, 1]


def test_first_error_is_raised_by_the_next_submit_or_drain_after_everything_stopped():
    done = []
    gate = threading.Event()

    def fail():
        gate.wait(5)
        raise OSError(28, "No space left on device")

    wb = WriteBehind()
    wb.submit(fail, 1)
    wb.submit(done.append, 1, "after")
    gate.set()
    with pytest.raises(OSError, match="No space"):
        wb.drain()
    assert done == ["after"]  # queued tasks finished before the error reached the caller
    wb.drain()  # raised once
    wb.submit(fail, 1)
    time.sleep(0.05)
    with pytest.raises(OSError, match="No space"):
        wb.submit(done.append, 1, "late")
    wb.close()


def test_close_waits_for_pending_tasks_and_drops_their_errors():
    out = []

    def slow():
        time.sleep(0.05)
        out.append(1)
        raise RuntimeError("ignored on close")

    wb = WriteBehind()
    wb.submit(slow, 1)
    wb.close()
    assert out == [1]


def test_a_shared_thread_outlives_each_queue_and_a_forked_child_starts_its_own():
    import multiprocessing as mp

    thread = WriteThread()
    idents = []
    for _ in range(2):
        wb = WriteBehind(thread=thread)
        wb.submit(lambda: idents.append(threading.get_ident()), 1)
        wb.drain()
        wb.close()  # the shared thread keeps running
    assert len(set(idents)) == 1 and threading.get_ident() not in idents

    def child(queue):
        out = []
        wb = WriteBehind(thread=thread)  # the parent's worker does not exist in this process
        wb.submit(out.append, 1, 7)
        wb.drain()
        queue.put(out)

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=30) == [7]
    finally:
        proc.join(timeout=30)
    thread.shutdown()


def test_gathered_items_run_as_one_task_in_order_with_submitted_ones():
    calls = []
    wb = WriteBehind(gather_bytes=10)
    wb.gather(lambda items: calls.append(("g", items)), "a", 4)
    wb.gather(lambda items: calls.append(("g", items)), "b", 4)
    wb.drain()
    assert calls == [("g", ["a"]), ("g", ["b"])]  # two functions: not gathered together
    calls.clear()
    run = calls.append
    wb.gather(run, "a", 4)
    wb.gather(run, "b", 4)
    time.sleep(0.02)
    assert calls == []  # 8 of 10 bytes held: not sent yet
    wb.submit(run, 1, "task")  # sends the held items first
    wb.gather(run, "c", 6)
    wb.gather(run, "d", 6)  # 12 >= 10: sent at once
    wb.gather(run, "e", 1)
    wb.drain()  # sends "e"
    wb.close()
    assert calls == [["a", "b"], "task", ["c", "d"], ["e"]]


def test_close_drops_what_is_gathered_and_an_error_reaches_the_next_gather():
    out = []
    wb = WriteBehind(gather_bytes=100)
    wb.gather(out.extend, [1], 1)
    wb.close()
    assert out == []  # abandoned, never written

    def fail(items):
        raise OSError(28, "No space left on device")

    wb = WriteBehind(gather_bytes=1)
    wb.gather(fail, "x", 1)
    time.sleep(0.05)
    with pytest.raises(OSError, match="No space"):
        wb.gather(out.extend, [2], 0)
    wb.close()


def test_a_pool_of_several_threads_runs_tasks_together_and_is_refused_as_an_ordered_queue():
    pool = WriteThread(workers=2)
    barrier = threading.Barrier(2, timeout=10)
    # Both tasks wait for each other: this only returns if two threads run them at once.
    futures = [pool.executor().submit(barrier.wait) for _ in range(2)]
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1]
    with pytest.raises(ValueError, match="`thread` must have one worker"):
        WriteBehind(thread=pool)
    with pytest.raises(ValueError, match="`workers` must be at least 1, got 0"):
        WriteThread(workers=0)
    pool.shutdown()
