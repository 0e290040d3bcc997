/* tunnelscope.analysis._scan: the decap fast path.
 *
 * Copies the UDP payloads of known tunnel flows from input capture records (classic pcap or
 * pcapng, outer link types Ethernet, Linux SLL/SLL2, raw IP) to output records (pcapng EPBs
 * or classic pcap records) without running Python per frame, and hands every frame of an
 * unknown flow back to Python; it walks the blocks of a live TPACKET_V3 packet ring in place
 * too (`scan_tpacket3`, for `tunnelscope sniff`). `tunnelscope.analysis.decap.PyScanner` is
 * the pure-Python twin of `Scanner`: same arguments, same results, same bytes; the module
 * documentation of tunnelscope/analysis/decap.py describes what both do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <limits.h>

enum { NEED_MORE = 0, FRAME = 1, BLOCK = 2 };
enum { LOC_NOT_UDP = 0, LOC_FRAGMENT = 1, LOC_UDP = 2 };
enum { PORTS_ALL = 0, PORTS_ONLY = 1, PORTS_EXCEPT = 2 };
enum {
    LT_ETHERNET = 1, LT_RAW = 101, LT_LINUX_SLL = 113, LT_IPV4 = 228, LT_IPV6 = 229,
    LT_LINUX_SLL2 = 276,
};

#define MAX_CAPLEN 262144u
#define MAX_BLOCK (16u * 1024u * 1024u)
#define KEY_LEN 37
#define DEDUPE_CAPACITY 65536u /* decap.DEDUPE_CAPACITY */
#define INDEX_SIZE (2u * DEDUPE_CAPACITY)
#define RETAINED (16u << 20) /* output buffer memory kept between calls, all streams together */
/* reassembly.py's bounds */
#define REASSEMBLY_DATAGRAMS 4096u
#define REASSEMBLY_BYTES (4u << 20)
#define FRAGMENT_OVERHEAD 64u
#define DUPLICATE_FRAGMENT_NS 1000000000ULL
#define TIMEOUT_V4_NS 30000000000ULL
#define TIMEOUT_V6_NS 60000000000ULL
#define DATAGRAM_INDEX (2u * REASSEMBLY_DATAGRAMS)
#define MAX_DATAGRAM 65536u

enum { LIVE = 0, DONE = 1, DEAD = 2 }; /* a datagram being reassembled, or its tombstone */
/* reassembly.LOST_REASONS, in order */
enum { LOST_TIMEOUT, LOST_INCOMPLETE, LOST_EVICTED, LOST_OVERLAP, LOST_MALFORMED, LOST_SNAPLEN,
       N_LOST };

typedef struct {
    uint8_t key[40]; /* KEY_LEN bytes, then zeros */
    uint64_t hash;
    uint64_t frames;
    int32_t stream; /* -1: not a tunnel */
    uint32_t iface;
    uint32_t direction;
    uint32_t used;
} Flow;

typedef struct {
    uint32_t linktype;
    uint32_t snaplen;
    uint64_t tsresol; /* nanoseconds per timestamp unit */
} Interface;

typedef struct {
    uint8_t *data;
    size_t len, cap;
} Output;

typedef struct {
    uint64_t hash, ts, flow, seq;
} Kept; /* one payload in the dedupe ring */

typedef struct {
    uint8_t key[40];
    const uint8_t *payload; /* in the record, or in the reassembled datagram */
    uint32_t caplen, orig_len;
    uint16_t sport, dport;
} Udp;

typedef struct { /* reassembly.Fragment */
    uint8_t key[40]; /* family, source, destination (16 bytes each), id (IPv4: id16, 17) */
    uint32_t offset, length, caplen; /* caplen: what the record holds of its data */
    const uint8_t *data;
    uint32_t header_len;
    int more, next_header;
} Frag;

typedef struct {
    uint32_t offset, length, at; /* at: in Datagram.data */
} Piece;

typedef struct {
    uint8_t key[40];
    uint64_t hash, first_ts, done_ts, charged;
    uint32_t total, top, have; /* total: 0 until the last fragment came; top: highest end */
    int state, next_header;
    uint8_t *data; /* the fragments' data, in arrival order */
    uint32_t used;
    Piece *pieces;
    uint32_t n_pieces, cap_pieces;
    uint8_t covered[MAX_DATAGRAM / 64]; /* one bit per 8-byte block */
} Datagram;

typedef struct {
    PyObject_HEAD
    int pcapng_input, output_pcapng, out_nanosecond, port_mode, big;
    uint32_t limit;
    int64_t window;
    uint8_t ports[8192];
    Interface *ifaces;
    size_t n_ifaces, cap_ifaces;
    Flow *flows;
    size_t flow_cap, flow_count; /* flow_cap: a power of two */
    Output *outs;
    size_t n_outs, retained; /* retained: capacity of all output buffers */
    Kept *ring;
    uint64_t *index; /* seq + 1 of the latest kept copy of a payload hash, 0: empty */
    uint64_t ring_head, ring_next;
    Datagram *datagrams; /* a ring, oldest first: (dg_head + i) % REASSEMBLY_DATAGRAMS */
    uint64_t *dg_index;  /* slot + 1 of a datagram, by key hash; 0: empty */
    uint32_t dg_head, dg_count;
    uint64_t pending_bytes, frag_max_ts;
    uint8_t *whole; /* the datagram completed last */
    unsigned long long frames, written, not_udp, fragments, not_tunnel, duplicates, last_ts;
    unsigned long long reassembled, duplicate_fragments, lost[N_LOST];
} Scanner;

/* ---- byte order ---------------------------------------------------------------------- */

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t rd32(const uint8_t *p, int big)
{
    if (big)
        return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

static inline uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
    return p + 4;
}

/* ---- hashing --------------------------------------------------------------------------- */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int r) { return x << r | x >> (64 - r); }

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL, w;
    size_t left = n;
    for (; left >= 8; left -= 8, p += 8) {
        memcpy(&w, p, 8);
        h = rotl(h ^ (w * 0xC2B2AE3D27D4EB4FULL), 31) * 0x9E3779B185EBCA87ULL;
    }
    w = 0;
    memcpy(&w, p, left);
    h = rotl(h ^ (w * 0xC2B2AE3D27D4EB4FULL), 31) * 0x9E3779B185EBCA87ULL;
    return mix64(h ^ n);
}

/* ---- finding the UDP payload (decap.locate_udp) --------------------------------------- */

/* past IPv6 hop-by-hop, routing and destination options headers: 0, or -1 when one does not
 * fit (decap._skip_extensions) */
static int skip_extensions(const uint8_t *d, uint32_t *next_header, uint32_t *at, uint32_t end)
{
    for (int i = 0; i < 8; i++) {
        if (!(*next_header == 0 || *next_header == 43 || *next_header == 60))
            break;
        if (end - *at < 8)
            return -1;
        *next_header = d[*at];
        *at += (d[*at + 1] + 1u) * 8;
        if (*at > end) /* a header running past the data: nothing more can fit */
            return -1;
    }
    return 0;
}

/* the UDP header at d + udp, the IP datagram holding `datagram` bytes from it; u->key holds
 * the family and addresses (decap._udp_in) */
static int udp_in(const uint8_t *d, uint32_t udp, uint32_t end, uint32_t datagram, Udp *u)
{
    if (end < udp || end - udp < 8)
        return LOC_NOT_UDP;
    uint32_t udp_length = be16(d + udp + 4);
    if (udp_length < 8 || udp_length > datagram)
        return LOC_NOT_UDP;
    memcpy(u->key + 33, d + udp, 4);
    u->sport = be16(d + udp);
    u->dport = be16(d + udp + 2);
    u->payload = d + udp + 8;
    u->orig_len = udp_length - 8;
    u->caplen = u->orig_len < end - udp - 8 ? u->orig_len : end - udp - 8;
    return LOC_UDP;
}

static int locate_udp(const uint8_t *d, uint32_t n, uint32_t linktype, Udp *u, Frag *f)
{
    uint32_t off, version, ethertype, end, udp, datagram;
    switch (linktype) {
    case LT_ETHERNET:
        if (n < 14)
            return LOC_NOT_UDP;
        ethertype = be16(d + 12);
        off = 14;
        for (int tag = 0; tag < 2; tag++) {
            if (!(ethertype == 0x8100 || ethertype == 0x88A8 || ethertype == 0x9100 ||
                  ethertype == 0x9200) ||
                n < off + 4)
                break;
            ethertype = be16(d + off + 2);
            off += 4;
        }
        version = ethertype == 0x0800 ? 4 : ethertype == 0x86DD ? 6 : 0;
        break;
    case LT_LINUX_SLL:
    case LT_LINUX_SLL2:
        off = linktype == LT_LINUX_SLL ? 16 : 20;
        if (n < off)
            return LOC_NOT_UDP;
        ethertype = be16(d + (linktype == LT_LINUX_SLL ? 14 : 0));
        version = ethertype == 0x0800 ? 4 : ethertype == 0x86DD ? 6 : 0;
        break;
    case LT_RAW:
        if (n < 1)
            return LOC_NOT_UDP;
        off = 0;
        version = d[0] >> 4;
        break;
    case LT_IPV4:
        off = 0;
        version = 4;
        break;
    case LT_IPV6:
        off = 0;
        version = 6;
        break;
    default:
        return LOC_NOT_UDP;
    }
    memset(u->key, 0, sizeof u->key);
    if (version == 4) {
        const uint8_t *ip = d + off;
        if (n - off < 20 || ip[0] >> 4 != 4)
            return LOC_NOT_UDP;
        uint32_t ihl = (ip[0] & 15u) * 4, total = be16(ip + 2), flags_offset = be16(ip + 6);
        if (ihl < 20 || ip[9] != 17)
            return LOC_NOT_UDP;
        end = off + (n - off < total ? n - off : total);
        udp = off + ihl;
        if (flags_offset & 0x3FFF) { /* MF or an offset: a fragment */
            if (total < ihl || end < udp)
                return LOC_NOT_UDP;
            memset(f->key, 0, sizeof f->key);
            f->key[0] = 4;
            memcpy(f->key + 1, ip + 12, 4);
            memcpy(f->key + 17, ip + 16, 4);
            memcpy(f->key + 33, ip + 4, 2);
            f->key[35] = 17;
            f->offset = (flags_offset & 0x1FFF) * 8;
            f->length = total - ihl;
            f->data = d + udp;
            f->caplen = end - udp;
            f->more = (flags_offset & 0x2000) != 0;
            f->header_len = ihl;
            f->next_header = 17;
            return LOC_FRAGMENT;
        }
        if (total < ihl + 8)
            return LOC_NOT_UDP;
        datagram = total - ihl;
        u->key[0] = 4;
        memcpy(u->key + 1, ip + 12, 4);
        memcpy(u->key + 17, ip + 16, 4);
    } else if (version == 6) {
        const uint8_t *ip = d + off;
        if (n - off < 40 || ip[0] >> 4 != 6)
            return LOC_NOT_UDP;
        uint32_t payload_length = be16(ip + 4), next_header = ip[6];
        end = off + (n - off < 40 + payload_length ? n - off : 40 + payload_length);
        udp = off + 40;
        if (skip_extensions(d, &next_header, &udp, end) < 0)
            return LOC_NOT_UDP;
        if (next_header == 44) { /* the fragment header */
            if (end - udp < 8)
                return LOC_NOT_UDP;
            uint32_t offset_flags = be16(d + udp + 2), start = udp + 8, first = d[udp];
            if (offset_flags & 0xFFF9) { /* an offset or M: a fragment */
                if (!(first == 17 || first == 0 || first == 43 || first == 60) ||
                    off + 40 + payload_length < start)
                    return LOC_NOT_UDP;
                memset(f->key, 0, sizeof f->key);
                f->key[0] = 6;
                memcpy(f->key + 1, ip + 8, 32);
                memcpy(f->key + 33, d + udp + 4, 4);
                f->offset = offset_flags & 0xFFF8;
                f->length = off + 40 + payload_length - start;
                f->data = d + start;
                f->caplen = end - start;
                f->more = offset_flags & 1;
                f->header_len = udp - off - 40;
                f->next_header = (int)first;
                return LOC_FRAGMENT;
            }
            next_header = first; /* an atomic fragment: the whole datagram */
            udp = start;
            if (skip_extensions(d, &next_header, &udp, end) < 0)
                return LOC_NOT_UDP;
        }
        if (next_header != 17)
            return LOC_NOT_UDP;
        datagram = off + 40 + payload_length - udp;
        u->key[0] = 6;
        memcpy(u->key + 1, ip + 8, 32);
    } else {
        return LOC_NOT_UDP;
    }
    return udp_in(d, udp, end, datagram, u);
}

/* decap.reassembled_udp: the UDP datagram in a reassembled fragmentable part */
static int reassembled_udp(const uint8_t *d, uint32_t total, const Frag *f, int next_header,
                           Udp *u)
{
    uint32_t first = (uint32_t)next_header, udp = 0;
    if (f->key[0] == 6 && skip_extensions(d, &first, &udp, total) < 0)
        return LOC_NOT_UDP;
    if (first != 17)
        return LOC_NOT_UDP;
    memset(u->key, 0, sizeof u->key);
    memcpy(u->key, f->key, 33);
    return udp_in(d, udp, total, total - udp, u);
}

/* ---- the flow table ------------------------------------------------------------------- */

static uint64_t key_hash(const uint8_t *key)
{
    uint64_t h = 0, w;
    for (int i = 0; i < 40; i += 8) {
        memcpy(&w, key + i, 8);
        h = rotl(h ^ (w * 0xC2B2AE3D27D4EB4FULL), 31) * 0x9E3779B185EBCA87ULL;
    }
    return mix64(h);
}

static Flow *flow_slot(Scanner *s, const uint8_t *key, uint64_t hash)
{
    size_t mask = s->flow_cap - 1, i = hash & mask;
    while (s->flows[i].used && !(s->flows[i].hash == hash && !memcmp(s->flows[i].key, key, 40)))
        i = (i + 1) & mask;
    return &s->flows[i];
}

static int flows_rebuild(Scanner *s, size_t cap, int keep_ignored)
{
    Flow *old = s->flows;
    size_t old_cap = s->flow_cap;
    s->flows = PyMem_Calloc(cap, sizeof(Flow));
    if (!s->flows) {
        s->flows = old;
        PyErr_NoMemory();
        return -1;
    }
    s->flow_cap = cap;
    s->flow_count = 0;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].used && (keep_ignored || old[i].stream >= 0)) {
            *flow_slot(s, old[i].key, old[i].hash) = old[i];
            s->flow_count++;
        }
    }
    PyMem_Free(old);
    return 0;
}

/* ---- dedupe ----------------------------------------------------------------------------- */

static Py_ssize_t index_find(Scanner *s, uint64_t hash)
{
    size_t mask = INDEX_SIZE - 1, i = hash & mask;
    for (; s->index[i]; i = (i + 1) & mask)
        if (s->ring[(s->index[i] - 1) & (DEDUPE_CAPACITY - 1)].hash == hash)
            return (Py_ssize_t)i;
    return -1;
}

typedef uint64_t (*EntryHash)(const Scanner *s, uint64_t entry);

static uint64_t kept_hash(const Scanner *s, uint64_t entry)
{
    return s->ring[(entry - 1) & (DEDUPE_CAPACITY - 1)].hash;
}

/* Remove index[i] from an open-addressed index of entry numbers (0: empty) of `mask` + 1
 * slots, moving back the entries behind it. */
static void index_delete(const Scanner *s, uint64_t *index, size_t mask, size_t i,
                         EntryHash hash_of)
{
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!index[j])
            break;
        size_t home = hash_of(s, index[j]) & mask;
        /* the entry at j may move back to i unless its home lies cyclically in (i, j] */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            index[i] = index[j];
            i = j;
        }
    }
    index[i] = 0;
}

/* later - earlier > window, on the full unsigned range (timestamps reach 2^64 - 1 ns, so a
 * signed difference would wrap), as decap.py's Python integers compare. */
static int later_by_more(uint64_t later, uint64_t earlier, uint64_t window)
{
    return later > earlier && later - earlier > window;
}

static int duplicate(Scanner *s, const uint8_t *p, size_t n, uint64_t ts, uint64_t flow)
{
    uint64_t window = (uint64_t)s->window;
    while (s->ring_head < s->ring_next) {
        Kept *old = &s->ring[s->ring_head & (DEDUPE_CAPACITY - 1)];
        if (!(later_by_more(ts, old->ts, window) ||
              s->ring_next - s->ring_head >= DEDUPE_CAPACITY))
            break;
        Py_ssize_t at = index_find(s, old->hash);
        if (at >= 0 && s->index[at] - 1 == old->seq)
            index_delete(s, s->index, INDEX_SIZE - 1, (size_t)at, kept_hash);
        s->ring_head++;
    }
    uint64_t hash = hash_bytes(p, n);
    Py_ssize_t at = index_find(s, hash);
    if (at >= 0) {
        Kept *seen = &s->ring[(s->index[at] - 1) & (DEDUPE_CAPACITY - 1)];
        if (seen->flow != flow && !later_by_more(ts, seen->ts, window) &&
            !later_by_more(seen->ts, ts, window))
            return 1;
    }
    uint64_t seq = s->ring_next++;
    Kept *kept = &s->ring[seq & (DEDUPE_CAPACITY - 1)];
    kept->hash = hash;
    kept->ts = ts;
    kept->flow = flow;
    kept->seq = seq;
    if (at < 0) {
        size_t mask = INDEX_SIZE - 1, i = hash & mask;
        while (s->index[i])
            i = (i + 1) & mask;
        at = (Py_ssize_t)i;
    }
    s->index[at] = seq + 1;
    return 0;
}

/* ---- IP reassembly (tunnelscope/analysis/reassembly.py, whose doc gives the rules) ------ */

static uint64_t datagram_hash(const Scanner *s, uint64_t entry)
{
    return s->datagrams[entry - 1].hash;
}

/* the datagram of `key`, or NULL; *at: its place in the index, or the free place for it */
static Datagram *datagram_find(Scanner *s, const uint8_t *key, uint64_t hash, size_t *at)
{
    size_t mask = DATAGRAM_INDEX - 1, i = hash & mask;
    for (; s->dg_index[i]; i = (i + 1) & mask) {
        Datagram *g = &s->datagrams[s->dg_index[i] - 1];
        if (g->hash == hash && !memcmp(g->key, key, 40)) {
            *at = i;
            return g;
        }
    }
    *at = i;
    return NULL;
}

static void datagram_free(Scanner *s, Datagram *g, int state)
{
    s->pending_bytes -= g->charged;
    g->charged = 0;
    PyMem_Free(g->data);
    PyMem_Free(g->pieces);
    g->data = NULL;
    g->pieces = NULL;
    g->used = g->n_pieces = g->cap_pieces = 0;
    g->state = state;
}

static void datagram_start(Datagram *g, uint64_t ts)
{
    g->state = LIVE;
    g->first_ts = ts;
    g->done_ts = 0;
    g->total = g->top = g->have = 0;
    g->next_header = -1;
    memset(g->covered, 0, sizeof g->covered);
}

static void drop_oldest(Scanner *s, int reason)
{
    Datagram *g = &s->datagrams[s->dg_head];
    size_t at;
    datagram_find(s, g->key, g->hash, &at);
    index_delete(s, s->dg_index, DATAGRAM_INDEX - 1, at, datagram_hash);
    if (g->state == LIVE)
        s->lost[reason]++;
    datagram_free(s, g, DEAD);
    s->dg_head = (s->dg_head + 1) % REASSEMBLY_DATAGRAMS;
    s->dg_count--;
}

static Datagram *datagram_new(Scanner *s, const uint8_t *key, uint64_t hash, uint64_t ts)
{
    if (s->dg_count == REASSEMBLY_DATAGRAMS)
        drop_oldest(s, LOST_EVICTED);
    size_t at;
    datagram_find(s, key, hash, &at);
    uint32_t slot = (s->dg_head + s->dg_count++) % REASSEMBLY_DATAGRAMS;
    Datagram *g = &s->datagrams[slot];
    memcpy(g->key, key, 40);
    g->hash = hash;
    datagram_start(g, ts);
    s->dg_index[at] = slot + 1;
    return g;
}

/* every 8-byte block of [offset, end) is covered (a duplicate) */
static int covers(const Datagram *g, uint32_t offset, uint32_t end)
{
    if (end == offset || end > MAX_DATAGRAM)
        return 0;
    for (uint32_t b = offset >> 3; b < (end + 7) >> 3; b++)
        if (!(g->covered[b >> 3] >> (b & 7) & 1))
            return 0;
    return 1;
}

static int overlaps(const Datagram *g, uint32_t offset, uint32_t end)
{
    for (uint32_t b = offset >> 3; b < (end + 7) >> 3; b++)
        if (g->covered[b >> 3] >> (b & 7) & 1)
            return 1;
    return 0;
}

static int abandon(Scanner *s, Datagram *g, int reason)
{
    datagram_free(s, g, DEAD);
    s->lost[reason]++;
    return 0;
}

/* 1: f completed its datagram (s->whole, *total bytes, first header *next_header), 0: it
 * waits or was given up, -1: error */
static int reassemble(Scanner *s, const Frag *f, uint64_t ts, uint32_t *total, int *next_header)
{
    if (!s->datagrams) {
        s->datagrams = PyMem_Calloc(REASSEMBLY_DATAGRAMS, sizeof(Datagram));
        s->dg_index = PyMem_Calloc(DATAGRAM_INDEX, sizeof(uint64_t));
        s->whole = PyMem_Malloc(MAX_DATAGRAM);
        if (!s->datagrams || !s->dg_index || !s->whole) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (ts > s->frag_max_ts)
        s->frag_max_ts = ts;
    while (s->dg_count) { /* expire */
        const Datagram *oldest = &s->datagrams[s->dg_head];
        uint64_t timeout = oldest->key[0] == 4 ? TIMEOUT_V4_NS : TIMEOUT_V6_NS;
        if (s->frag_max_ts - oldest->first_ts <= timeout)
            break;
        drop_oldest(s, LOST_TIMEOUT);
    }
    uint64_t hash = key_hash(f->key);
    uint32_t offset = f->offset, length = f->length, end = offset + length;
    size_t at;
    Datagram *g = datagram_find(s, f->key, hash, &at);
    if (g && g->state == DONE) {
        if (!later_by_more(ts, g->done_ts, DUPLICATE_FRAGMENT_NS) && covers(g, offset, end)) {
            s->duplicate_fragments++;
            return 0;
        }
        datagram_start(g, ts); /* a new datagram, same key */
    } else if (g && g->state == DEAD) {
        return 0;
    } else if (!g) {
        g = datagram_new(s, f->key, hash, ts);
    }
    if (f->caplen < length)
        return abandon(s, g, LOST_SNAPLEN);
    if (!length || (f->more && length % 8) || end + f->header_len > 65535 ||
        (!f->more && ((g->total && end != g->total) || end < g->top)) ||
        (f->more && g->total && end > g->total))
        return abandon(s, g, LOST_MALFORMED);
    if (covers(g, offset, end)) {
        s->duplicate_fragments++;
        return 0;
    }
    if (overlaps(g, offset, end))
        return abandon(s, g, LOST_OVERLAP);
    uint64_t charge = length + FRAGMENT_OVERHEAD;
    if (s->pending_bytes + charge > REASSEMBLY_BYTES) {
        while (s->dg_count && s->pending_bytes + charge > REASSEMBLY_BYTES / 4 * 3)
            drop_oldest(s, LOST_EVICTED);
        g = datagram_find(s, f->key, hash, &at);
        if (!g) { /* it was the oldest: keep its loss counted once */
            datagram_new(s, f->key, hash, ts)->state = DEAD;
            return 0;
        }
    }
    uint8_t *data = PyMem_Realloc(g->data, g->used + length);
    if (!data) {
        PyErr_NoMemory();
        return -1;
    }
    g->data = data;
    if (g->n_pieces == g->cap_pieces) {
        uint32_t cap = g->cap_pieces ? g->cap_pieces * 2 : 4;
        Piece *pieces = PyMem_Realloc(g->pieces, cap * sizeof(Piece));
        if (!pieces) {
            PyErr_NoMemory();
            return -1;
        }
        g->pieces = pieces;
        g->cap_pieces = cap;
    }
    memcpy(g->data + g->used, f->data, length);
    g->pieces[g->n_pieces++] = (Piece){offset, length, g->used};
    g->used += length;
    for (uint32_t b = offset >> 3; b < (end + 7) >> 3; b++)
        g->covered[b >> 3] |= (uint8_t)(1u << (b & 7));
    g->have += length;
    g->charged += charge;
    s->pending_bytes += charge;
    if (end > g->top)
        g->top = end;
    if (!f->more)
        g->total = end;
    if (offset == 0)
        g->next_header = f->next_header;
    if (!g->total || g->have != g->total)
        return 0;
    for (uint32_t i = 0; i < g->n_pieces; i++)
        memcpy(s->whole + g->pieces[i].offset, g->data + g->pieces[i].at, g->pieces[i].length);
    *total = g->total;
    *next_header = g->next_header;
    datagram_free(s, g, DONE);
    g->done_ts = ts;
    s->reassembled++;
    return 1;
}

/* end of input: every datagram still missing a fragment is lost */
static void reassembly_finish(Scanner *s)
{
    for (uint32_t i = 0; i < s->dg_count; i++) {
        Datagram *g = &s->datagrams[(s->dg_head + i) % REASSEMBLY_DATAGRAMS];
        if (g->state == LIVE)
            s->lost[LOST_INCOMPLETE]++;
        datagram_free(s, g, DEAD);
    }
    if (s->dg_index)
        memset(s->dg_index, 0, DATAGRAM_INDEX * sizeof(uint64_t));
    s->dg_head = s->dg_count = 0;
}

/* ---- output ----------------------------------------------------------------------------- */

static uint8_t *reserve(Scanner *s, Output *out, size_t size)
{
    if (out->len + size > out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 1u << 16;
        while (cap < out->len + size)
            cap *= 2;
        uint8_t *data = PyMem_Realloc(out->data, cap);
        if (!data) {
            PyErr_NoMemory();
            return NULL;
        }
        s->retained += cap - out->cap;
        out->data = data;
        out->cap = cap;
    }
    uint8_t *p = out->data + out->len;
    out->len += size;
    return p;
}

/* pcapng.enhanced_packet / pcap.record, byte for byte */
static int emit(Scanner *s, const Flow *flow, uint64_t ts, const uint8_t *data, uint32_t caplen,
                uint32_t orig_len)
{
    Output *out = &s->outs[flow->stream];
    uint8_t *p;
    if (s->output_pcapng) {
        uint32_t pad = -caplen & 3u, options = flow->direction ? 12 : 0;
        uint32_t total = 32 + caplen + pad + options;
        if (!(p = reserve(s, out, total)))
            return -1;
        p = put32(p, 6);
        p = put32(p, total);
        p = put32(p, flow->iface);
        p = put32(p, (uint32_t)(ts >> 32));
        p = put32(p, (uint32_t)ts);
        p = put32(p, caplen);
        p = put32(p, orig_len);
        memcpy(p, data, caplen);
        p += caplen;
        memset(p, 0, pad);
        p += pad;
        if (options) {
            p = put32(p, 2 | 4u << 16); /* epb_flags, 4 bytes */
            p = put32(p, flow->direction);
            p = put32(p, 0); /* opt_endofopt */
        }
        put32(p, total);
    } else {
        uint64_t sec = ts / 1000000000u, frac = ts % 1000000000u;
        if (sec > UINT32_MAX) /* past 2106: the last time a record holds, as pcap.record */
            sec = UINT32_MAX, frac = 999999999u;
        if (!(p = reserve(s, out, 16 + caplen)))
            return -1;
        p = put32(p, (uint32_t)sec);
        p = put32(p, (uint32_t)(s->out_nanosecond ? frac : frac / 1000));
        p = put32(p, caplen);
        p = put32(p, orig_len);
        memcpy(p, data, caplen);
    }
    return 0;
}

/* ---- one record --------------------------------------------------------------------------- */

/* 1: a frame of an unknown flow (u and *dup filled), 0: done with it, -1: error */
static int process(Scanner *s, const uint8_t *d, uint32_t caplen, uint32_t linktype,
                   uint64_t ts, Udp *u, int *dup)
{
    s->frames++;
    s->last_ts = ts;
    Frag f;
    int found = locate_udp(d, caplen, linktype, u, &f);
    if (found == LOC_FRAGMENT) {
        s->fragments++;
        uint32_t total;
        int next_header, r = reassemble(s, &f, ts, &total, &next_header);
        if (r <= 0)
            return r;
        found = reassembled_udp(s->whole, total, &f, next_header, u);
    }
    if (found != LOC_UDP) {
        s->not_udp++;
        return 0;
    }
    if (s->port_mode != PORTS_ALL) {
        int listed = (s->ports[u->sport >> 3] >> (u->sport & 7) & 1) ||
                     (s->ports[u->dport >> 3] >> (u->dport & 7) & 1);
        if (listed != (s->port_mode == PORTS_ONLY)) {
            s->not_tunnel++;
            return 0;
        }
    }
    uint64_t hash = key_hash(u->key);
    Flow *flow = flow_slot(s, u->key, hash);
    if (flow->used && flow->stream < 0) {
        s->not_tunnel++;
        return 0;
    }
    *dup = s->window ? duplicate(s, u->payload, u->caplen, ts, hash) : 0;
    if (!flow->used)
        return 1;
    if (*dup) {
        s->duplicates++;
        return 0;
    }
    if (emit(s, flow, ts, u->payload, u->caplen, u->orig_len) < 0)
        return -1;
    flow->frames++;
    s->written++;
    return 0;
}

static PyObject *frame_event(Py_ssize_t pos, uint64_t ts, const Udp *u, int dup)
{
    return Py_BuildValue("(in(Ky#y#IO))", FRAME, pos, (unsigned long long)ts, u->key,
                         (Py_ssize_t)KEY_LEN, u->payload, (Py_ssize_t)u->caplen, u->orig_len,
                         dup ? Py_True : Py_False);
}

static PyObject *scan_pcap(Scanner *s, const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end)
{
    if (!s->n_ifaces) {
        PyErr_SetString(PyExc_ValueError, "no interface declared");
        return NULL;
    }
    const Interface *iface = &s->ifaces[0];
    while (pos + 16 <= end) {
        const uint8_t *h = buf + pos;
        uint32_t sec = rd32(h, s->big), frac = rd32(h + 4, s->big), caplen = rd32(h + 8, s->big);
        if (caplen > s->limit)
            return PyErr_Format(PyExc_ValueError, "frame %llu: caplen %u above the %u-byte limit",
                                s->frames + 1, caplen, s->limit);
        if (pos + 16 + (Py_ssize_t)caplen > end)
            break;
        Py_ssize_t start = pos + 16;
        pos = start + caplen;
        Udp u;
        int dup = 0, r = process(s, buf + start, caplen, iface->linktype,
                                 (uint64_t)sec * 1000000000u + (uint64_t)frac * iface->tsresol, &u,
                                 &dup);
        if (r < 0)
            return NULL;
        if (r)
            return frame_event(pos, s->last_ts, &u, dup);
    }
    return Py_BuildValue("(inO)", NEED_MORE, pos, Py_None);
}

static PyObject *scan_pcapng(Scanner *s, const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end)
{
    static const uint8_t shb[4] = {0x0A, 0x0D, 0x0D, 0x0A};
    static const uint8_t little[4] = {0x4D, 0x3C, 0x2B, 0x1A}, big[4] = {0x1A, 0x2B, 0x3C, 0x4D};
    while (pos + 12 <= end) {
        const uint8_t *b = buf + pos;
        if (!memcmp(b, shb, 4)) {
            int order = !memcmp(b + 8, little, 4) ? 0 : !memcmp(b + 8, big, 4) ? 1 : -1;
            if (order < 0) {
                PyErr_SetString(PyExc_ValueError, "bad pcapng byte-order magic");
                return NULL;
            }
            uint32_t total = rd32(b + 4, order);
            if (total < 28 || total % 4 || total > MAX_BLOCK)
                return PyErr_Format(PyExc_ValueError, "bad pcapng section header length %u",
                                    total);
            return Py_BuildValue("(inO)", pos + (Py_ssize_t)total <= end ? BLOCK : NEED_MORE, pos,
                                 Py_None);
        }
        uint32_t type = rd32(b, s->big), total = rd32(b + 4, s->big);
        if (total < 12 || total % 4 || total > MAX_BLOCK)
            return PyErr_Format(PyExc_ValueError, "bad pcapng block length %u (block type 0x%x)",
                                total, type);
        if (pos + (Py_ssize_t)total > end)
            break;
        uint32_t linktype, caplen;
        uint64_t ts;
        Py_ssize_t start;
        if (type == 6) { /* EPB */
            unsigned long long number = s->frames + 1;
            if (total < 32)
                return PyErr_Format(PyExc_ValueError,
                                    "frame %llu: truncated enhanced packet block", number);
            uint32_t id = rd32(b + 8, s->big);
            if (id >= s->n_ifaces)
                return PyErr_Format(PyExc_ValueError, "frame %llu: unknown interface %u", number,
                                    id);
            caplen = rd32(b + 20, s->big);
            if (caplen > MAX_CAPLEN || 20 + caplen > total - 12)
                return PyErr_Format(PyExc_ValueError, "frame %llu: bad caplen %u", number,
                                    caplen);
            linktype = s->ifaces[id].linktype;
            ts = ((uint64_t)rd32(b + 12, s->big) << 32 | rd32(b + 16, s->big)) *
                 s->ifaces[id].tsresol;
            start = pos + 28;
        } else if (type == 3 && s->n_ifaces) { /* SPB */
            if (total < 16) {
                PyErr_SetString(PyExc_ValueError, "truncated simple packet block");
                return NULL;
            }
            uint32_t orig_len = rd32(b + 8, s->big), snaplen = s->ifaces[0].snaplen;
            caplen = orig_len;
            if (snaplen && snaplen < caplen)
                caplen = snaplen;
            if (total - 16 < caplen)
                caplen = total - 16;
            linktype = s->ifaces[0].linktype;
            ts = 0;
            start = pos + 12;
        } else {
            return Py_BuildValue("(inO)", BLOCK, pos, Py_None);
        }
        pos += total;
        Udp u;
        int dup = 0, r = process(s, buf + start, caplen, linktype, ts, &u, &dup);
        if (r < 0)
            return NULL;
        if (r)
            return frame_event(pos, ts, &u, dup);
    }
    return Py_BuildValue("(inO)", NEED_MORE, pos, Py_None);
}

/* ---- TPACKET_V3 blocks: a live packet ring (tunnelscope/analysis/sniff.py) ---------------- */

#define BLOCK_DESC_LEN 48 /* struct tpacket_block_desc */
#define TPACKET3_HDR_LEN 48 /* struct tpacket3_hdr */

static inline uint32_t ld32(const uint8_t *p) /* host byte order, as the kernel writes */
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* The packets of one block from number `index` on (decap.PyScanner.scan_tpacket3): the block
 * descriptor gives the count and the first packet's offset, each tpacket3_hdr the offset of
 * the next, its time, and where its frame starts (tp_mac) and how much of it the ring holds
 * (tp_snaplen). Stops after the packet that brings `written` to `stop_at`. */
static PyObject *scan_tpacket3(Scanner *s, const uint8_t *b, Py_ssize_t len, Py_ssize_t index,
                               unsigned long long stop_at)
{
    if (!s->n_ifaces) {
        PyErr_SetString(PyExc_ValueError, "no interface declared");
        return NULL;
    }
    if (len < BLOCK_DESC_LEN)
        return PyErr_Format(PyExc_ValueError, "truncated TPACKET_V3 block (%zd bytes)", len);
    uint32_t count = ld32(b + 12), linktype = s->ifaces[0].linktype;
    uint64_t at = ld32(b + 16), end = (uint64_t)len;
    for (uint32_t i = 0; i < count; i++) {
        if (at + TPACKET3_HDR_LEN > end)
            return PyErr_Format(PyExc_ValueError, "TPACKET_V3 packet %u lies past the block end",
                                i + 1);
        const uint8_t *h = b + at;
        uint32_t next = ld32(h), caplen = ld32(h + 12), mac = ld16(h + 24);
        if (at + mac + caplen > end)
            return PyErr_Format(PyExc_ValueError, "TPACKET_V3 packet %u runs past the block end",
                                i + 1);
        if (caplen > s->limit)
            return PyErr_Format(PyExc_ValueError, "frame %llu: caplen %u above the %u-byte limit",
                                s->frames + 1, caplen, s->limit);
        if (i + 1 < count && next < TPACKET3_HDR_LEN)
            return PyErr_Format(PyExc_ValueError, "TPACKET_V3 packet %u: bad next offset %u",
                                i + 1, next);
        if ((Py_ssize_t)i >= index) {
            Udp u;
            uint64_t ts = (uint64_t)ld32(h + 4) * 1000000000u + ld32(h + 8);
            int dup = 0, r = process(s, h + mac, caplen, linktype, ts, &u, &dup);
            if (r < 0)
                return NULL;
            if (r)
                return frame_event((Py_ssize_t)i + 1, ts, &u, dup);
            if (s->written >= stop_at)
                return Py_BuildValue("(inO)", NEED_MORE, (Py_ssize_t)i + 1, Py_None);
        }
        at += next;
    }
    return Py_BuildValue("(inO)", NEED_MORE, (Py_ssize_t)count, Py_None);
}

/* ---- the Python type ---------------------------------------------------------------------- */

static int Scanner_init(Scanner *s, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"pcapng_input", "caplen_limit", "output_pcapng", "out_nanosecond",
                            "dedupe_window_ns", "port_mode", "ports", NULL};
    int pcapng_input, output_pcapng, out_nanosecond, port_mode;
    unsigned int limit;
    long long window;
    Py_buffer ports;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "pIppLiy*", names, &pcapng_input, &limit,
                                     &output_pcapng, &out_nanosecond, &window, &port_mode,
                                     &ports))
        return -1;
    if (ports.len != sizeof s->ports) {
        PyBuffer_Release(&ports);
        PyErr_SetString(PyExc_ValueError, "ports must be an 8192-byte bitmap");
        return -1;
    }
    memcpy(s->ports, ports.buf, sizeof s->ports);
    PyBuffer_Release(&ports);
    if (s->flows) { /* __init__ called twice */
        PyErr_SetString(PyExc_RuntimeError, "Scanner already initialised");
        return -1;
    }
    s->pcapng_input = pcapng_input;
    s->limit = limit;
    s->output_pcapng = output_pcapng;
    s->out_nanosecond = out_nanosecond;
    s->window = window;
    s->port_mode = port_mode;
    s->flow_cap = 1024;
    s->flows = PyMem_Calloc(s->flow_cap, sizeof(Flow));
    if (!s->flows) {
        PyErr_NoMemory();
        return -1;
    }
    if (window) {
        s->ring = PyMem_Calloc(DEDUPE_CAPACITY, sizeof(Kept));
        s->index = PyMem_Calloc(INDEX_SIZE, sizeof(uint64_t));
        if (!s->ring || !s->index) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void Scanner_dealloc(Scanner *s)
{
    for (size_t i = 0; i < s->n_outs; i++)
        PyMem_Free(s->outs[i].data);
    PyMem_Free(s->outs);
    PyMem_Free(s->flows);
    PyMem_Free(s->ifaces);
    PyMem_Free(s->ring);
    PyMem_Free(s->index);
    if (s->datagrams)
        reassembly_finish(s);
    PyMem_Free(s->datagrams);
    PyMem_Free(s->dg_index);
    PyMem_Free(s->whole);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int check_ready(Scanner *s)
{
    if (!s->flows) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialised");
        return -1;
    }
    return 0;
}

static PyObject *Scanner_set_section(Scanner *s, PyObject *arg)
{
    int big = PyObject_IsTrue(arg);
    if (big < 0)
        return NULL;
    s->big = big;
    s->n_ifaces = 0;
    Py_RETURN_NONE;
}

static PyObject *Scanner_add_interface(Scanner *s, PyObject *args)
{
    unsigned int linktype, snaplen;
    unsigned long long tsresol;
    if (!PyArg_ParseTuple(args, "IKI", &linktype, &tsresol, &snaplen))
        return NULL;
    if (s->n_ifaces == s->cap_ifaces) {
        size_t cap = s->cap_ifaces ? s->cap_ifaces * 2 : 8;
        Interface *ifaces = PyMem_Realloc(s->ifaces, cap * sizeof(Interface));
        if (!ifaces)
            return PyErr_NoMemory();
        s->ifaces = ifaces;
        s->cap_ifaces = cap;
    }
    s->ifaces[s->n_ifaces++] = (Interface){linktype, snaplen, tsresol};
    Py_RETURN_NONE;
}

static PyObject *Scanner_set_flow(Scanner *s, PyObject *args)
{
    Py_buffer key;
    int stream;
    unsigned int iface, direction;
    if (check_ready(s) < 0 || !PyArg_ParseTuple(args, "y*iII", &key, &stream, &iface, &direction))
        return NULL;
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "a flow key is 37 bytes");
        return NULL;
    }
    uint8_t padded[40] = {0};
    memcpy(padded, key.buf, KEY_LEN);
    PyBuffer_Release(&key);
    if (stream >= 0 && (size_t)stream >= s->n_outs) {
        size_t n_outs = (size_t)stream + 1;
        Output *outs = PyMem_Realloc(s->outs, n_outs * sizeof(Output));
        if (!outs)
            return PyErr_NoMemory();
        memset(outs + s->n_outs, 0, (n_outs - s->n_outs) * sizeof(Output));
        s->outs = outs;
        s->n_outs = n_outs;
    }
    if (2 * (s->flow_count + 1) > s->flow_cap && flows_rebuild(s, s->flow_cap * 2, 1) < 0)
        return NULL;
    uint64_t hash = key_hash(padded);
    Flow *flow = flow_slot(s, padded, hash);
    if (!flow->used) {
        memcpy(flow->key, padded, 40);
        flow->hash = hash;
        flow->frames = 0;
        flow->used = 1;
        s->flow_count++;
    }
    flow->stream = stream;
    flow->iface = iface;
    flow->direction = direction;
    Py_RETURN_NONE;
}

static PyObject *Scanner_clear_ignored(Scanner *s, PyObject *Py_UNUSED(arg))
{
    if (check_ready(s) < 0 || flows_rebuild(s, s->flow_cap, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Scanner_flow_frames(Scanner *s, PyObject *arg)
{
    Py_buffer key;
    if (check_ready(s) < 0 || PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t padded[40] = {0};
    memcpy(padded, key.buf, key.len < KEY_LEN ? (size_t)key.len : KEY_LEN);
    int valid = key.len == KEY_LEN;
    PyBuffer_Release(&key);
    Flow *flow = valid ? flow_slot(s, padded, key_hash(padded)) : NULL;
    return PyLong_FromUnsignedLongLong(flow && flow->used ? flow->frames : 0);
}

static PyObject *Scanner_counters(Scanner *s, PyObject *Py_UNUSED(arg))
{
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "frames", s->frames, "written", s->written, "not_udp",
        s->not_udp, "fragments", s->fragments, "not_tunnel", s->not_tunnel, "duplicates",
        s->duplicates, "reassembled", s->reassembled, "duplicate_fragments",
        s->duplicate_fragments, "lost_timeout", s->lost[LOST_TIMEOUT], "lost_incomplete",
        s->lost[LOST_INCOMPLETE], "lost_evicted", s->lost[LOST_EVICTED], "lost_overlap",
        s->lost[LOST_OVERLAP], "lost_malformed", s->lost[LOST_MALFORMED], "lost_snaplen",
        s->lost[LOST_SNAPLEN]);
}

static PyObject *Scanner_finish(Scanner *s, PyObject *Py_UNUSED(arg))
{
    if (s->datagrams)
        reassembly_finish(s);
    Py_RETURN_NONE;
}

/* An emptied buffer is kept for the next chunk unless the buffers hold too much in all. */
static void emptied(Scanner *s, Output *out)
{
    out->len = 0;
    if (s->retained > RETAINED) {
        s->retained -= out->cap;
        PyMem_Free(out->data);
        out->data = NULL;
        out->cap = 0;
    }
}

static PyObject *Scanner_take(Scanner *s, PyObject *Py_UNUSED(arg))
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (size_t i = 0; i < s->n_outs; i++) {
        Output *out = &s->outs[i];
        if (!out->len)
            continue;
        PyObject *item = Py_BuildValue("(ny#)", (Py_ssize_t)i, out->data, (Py_ssize_t)out->len);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
        emptied(s, out);
    }
    return list;
}

static PyObject *Scanner_write(Scanner *s, PyObject *arg)
{
    PyObject *fds = PySequence_Fast(arg, "fds must be a sequence of file descriptors");
    if (!fds)
        return NULL;
    size_t count = (size_t)PySequence_Fast_GET_SIZE(fds);
    for (size_t i = 0; i < s->n_outs && i < count; i++) {
        Output *out = &s->outs[i];
        if (!out->len)
            continue;
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        if (fd < 0 || fd > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            goto fail;
        }
        size_t done = 0;
        while (done < out->len) {
            ssize_t n;
            Py_BEGIN_ALLOW_THREADS
            n = write((int)fd, out->data + done, out->len - done);
            Py_END_ALLOW_THREADS
            if (n >= 0) {
                done += (size_t)n;
                continue;
            }
            int err = errno;
            if (err == EINTR && PyErr_CheckSignals() == 0)
                continue;
            if (err != EINTR) { /* the OSError's filename is the stream */
                PyObject *stream = PyLong_FromSize_t(i);
                errno = err;
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, stream);
                Py_XDECREF(stream);
            }
            goto fail;
        }
        emptied(s, out);
    }
    Py_DECREF(fds);
    Py_RETURN_NONE;
fail:
    Py_DECREF(fds);
    return NULL;
}

static PyObject *Scanner_scan(Scanner *s, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, end;
    if (check_ready(s) < 0 || !PyArg_ParseTuple(args, "y*nn", &view, &pos, &end))
        return NULL;
    PyObject *result;
    if (pos < 0 || end < pos || end > view.len) {
        PyErr_SetString(PyExc_ValueError, "pos and end must lie within the buffer");
        result = NULL;
    } else if (s->pcapng_input) {
        result = scan_pcapng(s, view.buf, pos, end);
    } else {
        result = scan_pcap(s, view.buf, pos, end);
    }
    PyBuffer_Release(&view);
    return result;
}

static PyObject *Scanner_scan_tpacket3(Scanner *s, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t index;
    unsigned long long stop_at = ULLONG_MAX;
    if (check_ready(s) < 0 || !PyArg_ParseTuple(args, "y*n|K", &view, &index, &stop_at))
        return NULL;
    PyObject *result;
    if (index < 0) {
        PyErr_SetString(PyExc_ValueError, "index must not be negative");
        result = NULL;
    } else {
        result = scan_tpacket3(s, view.buf, view.len, index, stop_at);
    }
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef Scanner_methods[] = {
    {"set_section", (PyCFunction)Scanner_set_section, METH_O,
     "Byte order of what follows (True: big-endian); forgets the interfaces."},
    {"add_interface", (PyCFunction)Scanner_add_interface, METH_VARARGS,
     "add_interface(linktype, tsresol_ns, snaplen): the next input interface."},
    {"set_flow", (PyCFunction)Scanner_set_flow, METH_VARARGS,
     "set_flow(key, stream, iface, direction): stream -1 leaves the flow out."},
    {"clear_ignored", (PyCFunction)Scanner_clear_ignored, METH_NOARGS,
     "Forget the flows that were left out."},
    {"flow_frames", (PyCFunction)Scanner_flow_frames, METH_O, "Frames written for a flow."},
    {"counters", (PyCFunction)Scanner_counters, METH_NOARGS, "Frame counters."},
    {"finish", (PyCFunction)Scanner_finish, METH_NOARGS,
     "End of input: datagrams still waiting for a fragment are lost."},
    {"take", (PyCFunction)Scanner_take, METH_NOARGS,
     "The output produced since the last call: [(stream, bytes)], in stream order."},
    {"write", (PyCFunction)Scanner_write, METH_O,
     "write(fds): write the output produced since the last call, stream i to fds[i]."},
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS,
     "scan(buf, pos, end) -> (event, pos, frame info or None)."},
    {"scan_tpacket3", (PyCFunction)Scanner_scan_tpacket3, METH_VARARGS,
     "scan_tpacket3(block, index[, stop_at]) -> (event, index, frame info or None)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Scanner_members[] = {
    {"last_ts", T_ULONGLONG, offsetof(Scanner, last_ts), READONLY,
     "Timestamp (ns) of the last record scanned."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tunnelscope.analysis._scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Copies known tunnel flows from capture records to output records.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_members = Scanner_members,
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "tunnelscope.analysis._scan",
    "The decap fast path; tunnelscope.analysis.decap.PyScanner is its pure-Python twin.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&scan_module);
    if (!module)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(module, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
