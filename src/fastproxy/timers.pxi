# Timer lists: a worker's bridges of one listener on one list per duration,
# so appending keeps each list sorted and the head is always the next to
# come due. (Listeners may set different durations: lists shared across
# them would need sorted inserts.)

cdef enum:
    SLOT_PHASE = 0         # PROXY header, queue wait, ClientHello, connect
    SLOT_HALF_CLOSE = 1
    SLOT_IDLE = 2
    SLOT_LIFETIME = 3
    SLOT_HOOK = 4

cdef int SLOT_OF[9]        # T_LISTS
SLOT_OF[T_NONE] = 0
SLOT_OF[T_CONNECT] = SLOT_PHASE
SLOT_OF[T_HALF_CLOSE] = SLOT_HALF_CLOSE
SLOT_OF[T_IDLE] = SLOT_IDLE
SLOT_OF[T_LIFETIME] = SLOT_LIFETIME
SLOT_OF[T_QUEUE] = SLOT_PHASE
SLOT_OF[T_HEADER] = SLOT_PHASE
SLOT_OF[T_HOOK] = SLOT_HOOK
SLOT_OF[T_HELLO] = SLOT_PHASE


cdef inline TimerLink *tlink(Bridge *b, int slot) noexcept nogil:
    # SLOT_HOOK's link is in the block a bridge gets with its first hook
    # call; only such a bridge is ever on T_HOOK.
    return &b.tl[slot] if slot < T_SLOTS else &b.hk.tl


cdef inline void timer_del(Worker *w, Bridge *b, int slot) noexcept nogil:
    cdef TimerLink *l = tlink(b, slot)
    cdef ListenerSlot *s = &b.ls.slots[w.id]
    cdef int t = l.list
    if t == T_NONE:
        return
    if l.prev != NULL:
        tlink(l.prev, slot).next = l.next
    else:
        s.thead[t] = l.next
    if l.next != NULL:
        tlink(l.next, slot).prev = l.prev
    else:
        s.ttail[t] = l.prev
    l.prev = NULL
    l.next = NULL
    l.list = T_NONE


cdef inline void timer_del_all(Worker *w, Bridge *b) noexcept nogil:
    cdef int slot
    for slot in range(T_SLOTS):
        timer_del(w, b, slot)
    if b.hk != NULL:
        timer_del(w, b, SLOT_HOOK)


cdef inline void timer_add(Worker *w, Bridge *b, int t, int64_t deadline) noexcept nogil:
    # Lists of one duration are appended to (O(1)); an idle timer re-armed
    # for its exact remaining time walks back from the tail to its place.
    cdef int slot = SLOT_OF[t]
    cdef TimerLink *l = tlink(b, slot)
    cdef ListenerSlot *s = &b.ls.slots[w.id]
    cdef Bridge *after
    timer_del(w, b, slot)   # first: b may be the tail it would link after
    after = s.ttail[t]
    while after != NULL and tlink(after, slot).deadline_ns > deadline:
        after = tlink(after, slot).prev
    l.list = <uint8_t>t
    l.deadline_ns = deadline
    l.prev = after
    if after != NULL:
        l.next = tlink(after, slot).next
        tlink(after, slot).next = b
    else:
        l.next = s.thead[t]
        s.thead[t] = b
    if l.next != NULL:
        tlink(l.next, slot).prev = b
    else:
        s.ttail[t] = b


cdef inline bint timer_due(ListenerSlot *s, int t, int64_t now) noexcept nogil:
    cdef Bridge *b = s.thead[t]
    return b != NULL and tlink(b, SLOT_OF[t]).deadline_ns <= now
