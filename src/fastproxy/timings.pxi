# Per-bridge timings and the histograms they feed. Stamps come from the
# worker's loop clock (the `now` of its wake-up, Worker.now_ns): no clock
# read per bridge. A bridge keeps when its upstream connect began and, as
# microseconds, its queue wait and connect time (16 bytes in all: an idle
# bridge's size is the proxy's memory per connection).
#
# Connect time is HAProxy's Tc: the connect to the address (of the upstream)
# that took the bridge, from its start to established; failed addresses and
# upstreams before it count in neither (they show in connect_failures), so
# a slow retry does not read as a slow upstream. Queue wait is from accept
# to the last time the bridge left the wait queue. Duration is accept to
# close, for every bridge a worker accepted (refused ones too: what a client
# of the listener saw).

# Upper bounds in seconds, ascending, log scale (1-2.5-5 per decade, then
# minutes for durations); a last +Inf bucket follows each. Prometheus
# buckets are "less or equal": so are these.
cdef tuple CONNECT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0)
cdef tuple DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                              5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
cdef int64_t connect_bounds_ns[19]    # HIST_MAX - 1
cdef int64_t duration_bounds_ns[19]


cdef int bounds_init(tuple bounds, int64_t *out) except -1:
    # Returns: how many bounds (the buckets are one more).
    cdef int i
    if len(bounds) > HIST_MAX - 1:
        raise ValueError("more bounds than a Histogram has buckets")
    for i in range(len(bounds)):
        out[i] = <int64_t>(bounds[i] * 1e9 + 0.5)
    return len(bounds)


cdef int n_connect_bounds = bounds_init(CONNECT_BOUNDS, connect_bounds_ns)
cdef int n_duration_bounds = bounds_init(DURATION_BOUNDS, duration_bounds_ns)


cdef inline void hist_add(Histogram *h, const int64_t *bounds, int n, int64_t v) noexcept nogil:
    # The worker owning the slot is the only writer: relaxed stores.
    cdef int i = 0
    if v < 0:
        v = 0
    while i < n and v > bounds[i]:
        i += 1
    fp_bump(&h.counts[i], 1)
    fp_bump(&h.sum_ns, <uint64_t>v)


cdef inline uint32_t us_between(int64_t since, int64_t now) noexcept nogil:
    # Saturates at about 71 minutes.
    cdef int64_t us = (now - since) // 1000
    cdef int64_t most = <int64_t>0xFFFFFFFF
    if us < 0:
        return 0
    return <uint32_t>(us if us < most else most)


cdef inline void timing_left_queue(Bridge *b, int64_t now) noexcept nogil:
    b.queue_us = us_between(b.accepted_ns, now)


cdef inline void timing_connected(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    b.connect_us = us_between(b.connect_start_ns, now)
    hist_add(&lslot(w, b.ls).connect_hist, connect_bounds_ns, n_connect_bounds,
             now - b.connect_start_ns)


cdef inline void timing_closed(Worker *w, Bridge *b) noexcept nogil:
    hist_add(&lslot(w, b.ls).duration_hist, duration_bounds_ns, n_duration_bounds,
             w.now_ns - b.accepted_ns)


cdef void hist_sum(Histogram *total, Histogram *h) noexcept nogil:
    cdef int i
    for i in range(HIST_MAX):
        total.counts[i] += fp_load(&h.counts[i])
    total.sum_ns += fp_load(&h.sum_ns)


cdef dict hist_dict(Histogram *h, tuple bounds):
    # The shape the stats endpoint renders: per-bucket (not cumulative)
    # counts, the last bucket +Inf.
    cdef int i
    counts = [h.counts[i] for i in range(len(bounds) + 1)]
    return {"bounds": list(bounds) + [float("inf")], "counts": counts,
            "sum": h.sum_ns / 1e9, "count": sum(counts)}
