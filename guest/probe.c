/*
 * probe.c - Ferry test-guest workload.
 *
 * Runs as the guest's only real process.  It keeps a block of memory filled
 * with a self-describing pattern, dirties part of it at a fixed rate (so the
 * migration has something to chase) and continuously verifies it (so a page
 * lost, torn or left stale by the migration is noticed).  Once per second it
 * prints a heartbeat on stdout, which init points at the serial console; the
 * host side parses those lines.
 *
 * Kernel command line (read from /proc/cmdline):
 *   ferry.probe_mib=N     MiB of memory to hold (default 64)
 *   ferry.dirty_mib_s=R   MiB/s to rewrite (default 0, integer)
 *
 * Output lines (stable interface, parsed by the host):
 *   FERRY-PROBE-READY mem_mib=<N> rate_mib_s=<R>
 *   FERRY-PROBE v1 seq=<n> uptime_ms=<ms> mem_mib=<N> rate_mib_s=<R>
 *       pages_written=<n> mem_errors=<n> disk_errors=<n>      (one line)
 *   FERRY-PROBE-ERROR page=<i> ...                            (first 10 only)
 *   FERRY-PROBE-FATAL ...                  (could not start; process exits)
 * uptime_ms counts from the READY line (after the memory fill), on the
 * guest's CLOCK_MONOTONIC, which does not advance while the VM is paused, so
 * migration downtime is invisible here: time it on the host.  Lines end in
 * "\r\n" on the serial console (tty ONLCR).
 *
 * FERRY_PROBE_CMDLINE_FILE=<path> replaces /proc/cmdline (for host tests).
 *
 * Build: gcc -O2 -static -o probe probe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define PAGES_PER_MIB (1024u * 1024u / PAGE_SIZE) /* 256 */

#define TICK_NS 100000000LL         /* 100 ms work quantum */
#define TICKS_PER_SEC 10
#define REPORT_NS 1000000000LL      /* heartbeat period */
#define SWEEP_PERIOD_TICKS 50       /* full verify pass every ~5 s */
#define MAX_CATCHUP_TICKS 5         /* after a stall, drop older ticks */
#define MAX_ERROR_REPORTS 10

#define DEFAULT_MIB 64
#define MAX_MIB (1u << 20)          /* keeps page counts within uint32_t */

struct probe {
    unsigned mem_mib;
    unsigned rate_mib_s;

    uint64_t *mem;          /* npages * PAGE_SIZE bytes, page aligned */
    uint32_t npages;
    uint32_t *gen;          /* expected generation of each page */

    uint32_t write_cursor;  /* round-robin position of the dirtier */
    uint32_t sweep_cursor;  /* round-robin position of the verifier */
    uint64_t write_credit;  /* pages owed, in tenths (R*256/10 per tick) */

    uint64_t pages_written;
    uint64_t mem_errors;
    uint64_t disk_errors;   /* reserved for a later disk mode; always 0 */
    uint64_t seq;
};

/* splitmix64 finaliser: cheap, and every input bit affects every output bit,
 * so a page from another index or generation cannot match by accident. */
static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Word 0 carries (page, gen) in the clear so an error report can say what was
 * actually found; the other words are seed + w*K.  Hashing once per page and
 * then only adding keeps the per-word cost tiny (this runs under TCG), while
 * still making each word depend on page index, generation and word index. */
static inline uint64_t page_header(uint32_t page, uint32_t gen)
{
    return ((uint64_t)page << 32) | gen;
}

static inline uint64_t page_seed(uint32_t page, uint32_t gen)
{
    return mix64(page_header(page, gen) ^ 0x46455252595052ULL /* "FERRYPR" */);
}

#define WORD_STEP 0x9e3779b97f4a7c15ULL

static uint64_t *page_ptr(struct probe *p, uint32_t page)
{
    return p->mem + (size_t)page * WORDS_PER_PAGE;
}

static void fill_page(struct probe *p, uint32_t page, uint32_t gen)
{
    uint64_t *w = page_ptr(p, page);
    uint64_t v = page_seed(page, gen);

    w[0] = page_header(page, gen);
    for (unsigned i = 1; i < WORDS_PER_PAGE; i++)
        w[i] = v + i * WORD_STEP;
    p->gen[page] = gen;
}

/* Returns the index of the first bad word, or -1 if the page is intact. */
static int check_page(struct probe *p, uint32_t page, uint32_t gen)
{
    const uint64_t *w = page_ptr(p, page);
    uint64_t v = page_seed(page, gen);
    uint64_t bad = w[0] ^ page_header(page, gen);

    /* Accumulate instead of branching per word: the common case is a clean
     * page, and a branch-free loop is much cheaper under emulation. */
    for (unsigned i = 1; i < WORDS_PER_PAGE; i++)
        bad |= w[i] ^ (v + i * WORD_STEP);
    if (!bad)
        return -1;

    if (w[0] != page_header(page, gen))
        return 0;
    for (unsigned i = 1; i < WORDS_PER_PAGE; i++)
        if (w[i] != v + i * WORD_STEP)
            return (int)i;
    return -1; /* changed under us; cannot happen single-threaded */
}

static void emit(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    /* One write() per line so a line is never interleaved or left buffered
     * in the process when the VM is frozen for migration. */
    for (char *s = buf; n > 0;) {
        ssize_t r = write(STDOUT_FILENO, s, (size_t)n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        s += r;
        n -= (int)r;
    }
}

static void report_error(struct probe *p, uint32_t page, uint32_t gen, int word,
                         const char *what)
{
    p->mem_errors++;
    if (p->mem_errors > MAX_ERROR_REPORTS)
        return;

    const uint64_t *w = page_ptr(p, page);
    uint64_t want = word == 0 ? page_header(page, gen)
                              : page_seed(page, gen) + (uint64_t)word * WORD_STEP;
    emit("FERRY-PROBE-ERROR page=%" PRIu32 " want_gen=%" PRIu32
         " word=%d got=0x%016" PRIx64 " want=0x%016" PRIx64
         " hdr_page=%" PRIu32 " hdr_gen=%" PRIu32 " during=%s\n",
         page, gen, word, w[word], want,
         (uint32_t)(w[0] >> 32), (uint32_t)w[0], what);
}

/* Verify against the expected generation, then write the next one.  A bad
 * page is counted but still rewritten, which also resynchronises it. */
static void dirty_one(struct probe *p)
{
    uint32_t page = p->write_cursor;
    uint32_t gen = p->gen[page];
    int bad = check_page(p, page, gen);

    if (bad >= 0)
        report_error(p, page, gen, bad, "write");
    fill_page(p, page, gen + 1);
    p->pages_written++;
    if (++p->write_cursor == p->npages)
        p->write_cursor = 0;
}

static void verify_one(struct probe *p)
{
    uint32_t page = p->sweep_cursor;
    uint32_t gen = p->gen[page];
    int bad = check_page(p, page, gen);

    if (bad >= 0) {
        report_error(p, page, gen, bad, "sweep");
        fill_page(p, page, gen); /* repair, so it is counted once */
    }
    if (++p->sweep_cursor == p->npages)
        p->sweep_cursor = 0;
}

static void tick(struct probe *p, uint32_t sweep_per_tick)
{
    /* R MiB/s = R*256 pages/s = R*256/10 pages per tick; carry the fraction
     * so e.g. 1 MiB/s really writes 256 pages per second. */
    p->write_credit += (uint64_t)p->rate_mib_s * PAGES_PER_MIB;
    uint64_t n = p->write_credit / TICKS_PER_SEC;
    p->write_credit %= TICKS_PER_SEC;
    for (uint64_t i = 0; i < n; i++)
        dirty_one(p);

    for (uint32_t i = 0; i < sweep_per_tick; i++)
        verify_one(p);
}

/* ---- setup ------------------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
    struct timespec ts = { .tv_sec = t / 1000000000LL,
                           .tv_nsec = t % 1000000000LL };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Looks up "key=<unsigned>" as a whole word; returns def if absent/invalid. */
static unsigned cmdline_uint(const char *cmdline, const char *key, unsigned def,
                             unsigned max)
{
    size_t klen = strlen(key);

    for (const char *s = cmdline; (s = strstr(s, key)) != NULL; s += klen) {
        if (s != cmdline && s[-1] != ' ')
            continue;
        if (s[klen] != '=')
            continue;
        char *end;
        errno = 0;
        unsigned long v = strtoul(s + klen + 1, &end, 10);
        if (errno || end == s + klen + 1 || (*end && *end != ' ' && *end != '\n')
            || v > max)
            return def;
        return (unsigned)v;
    }
    return def;
}

static void read_config(struct probe *p)
{
    char cmdline[4096] = "";
    /* Override for running the probe on a host, e.g. in tests. */
    const char *path = getenv("FERRY_PROBE_CMDLINE_FILE");
    FILE *f = fopen(path ? path : "/proc/cmdline", "r");

    if (f) {
        if (!fgets(cmdline, sizeof(cmdline), f))
            cmdline[0] = '\0';
        fclose(f);
    } else {
        fprintf(stderr, "probe: cannot read /proc/cmdline, using defaults\n");
    }
    p->mem_mib = cmdline_uint(cmdline, "ferry.probe_mib", DEFAULT_MIB, MAX_MIB);
    if (p->mem_mib == 0)
        p->mem_mib = DEFAULT_MIB;
    p->rate_mib_s = cmdline_uint(cmdline, "ferry.dirty_mib_s", 0, 1u << 20);
}

int main(void)
{
    struct probe p = { 0 };

    read_config(&p);
    p.npages = p.mem_mib * PAGES_PER_MIB;

    /* Page aligned so each logical page is exactly one guest-physical page,
     * i.e. one unit of migration dirty tracking. */
    if (posix_memalign((void **)&p.mem, PAGE_SIZE, (size_t)p.npages * PAGE_SIZE)) {
        emit("FERRY-PROBE-FATAL cannot allocate mem_mib=%u\n", p.mem_mib);
        return 1;
    }
    p.gen = calloc(p.npages, sizeof(*p.gen));
    if (!p.gen) {
        emit("FERRY-PROBE-FATAL cannot allocate page table\n");
        return 1;
    }
    /* Touching everything up front makes the whole block resident and
     * non-zero, so migration has to transfer all of it. */
    for (uint32_t i = 0; i < p.npages; i++)
        fill_page(&p, i, 0);

    uint32_t sweep_per_tick = (p.npages + SWEEP_PERIOD_TICKS - 1) / SWEEP_PERIOD_TICKS;
    int64_t start = now_ns();
    int64_t next_tick = start + TICK_NS;
    int64_t next_report = start + REPORT_NS;

    emit("FERRY-PROBE-READY mem_mib=%u rate_mib_s=%u\n", p.mem_mib, p.rate_mib_s);

    for (;;) {
        int64_t now = now_ns();

        if (now >= next_tick) {
            tick(&p, sweep_per_tick);
            next_tick += TICK_NS;
            /* Catch up a little after a hiccup, but after a long stall (VM
             * paused, host overloaded) resume the nominal rate instead of
             * bursting; pages_written shows the shortfall. */
            if (now - next_tick > MAX_CATCHUP_TICKS * TICK_NS)
                next_tick = now + TICK_NS;
            now = now_ns();
        }

        if (now >= next_report) {
            emit("FERRY-PROBE v1 seq=%" PRIu64 " uptime_ms=%" PRId64
                 " mem_mib=%u rate_mib_s=%u pages_written=%" PRIu64
                 " mem_errors=%" PRIu64 " disk_errors=%" PRIu64 "\n",
                 ++p.seq, (now - start) / 1000000, p.mem_mib, p.rate_mib_s,
                 p.pages_written, p.mem_errors, p.disk_errors);
            next_report += REPORT_NS;
            if (next_report <= now) /* stalled > 1 s: no burst of lines */
                next_report = now + REPORT_NS;
        }

        if (now >= next_tick)
            continue;

        sleep_until(next_tick < next_report ? next_tick : next_report);
    }
}
