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
 * Optionally (disk mode) it does the same to a region of a block device, so a
 * block lost, torn, misplaced or left stale by a storage migration (e.g.
 * QEMU blockdev-mirror) is noticed too.
 *
 * Kernel command line (read from /proc/cmdline):
 *   ferry.probe_mib=N     MiB of memory to hold (default 64)
 *   ferry.dirty_mib_s=R   MiB/s to rewrite (default 0, integer)
 *   ferry.disk=DEV        block device for disk mode (e.g. /dev/vda); disk
 *                         mode is on only when this is given
 *   ferry.disk_mib=N      MiB of DEV to use, from offset 0 (default and cap:
 *                         the whole device, rounded down to whole MiB)
 *   ferry.disk_mib_s=R    MiB/s to rewrite on the disk (default 0: verify only)
 *
 * Output lines (stable interface, parsed by the host):
 *   FERRY-PROBE-DISK-INIT done=<blocks>      (disk mode: region initialised)
 *   FERRY-PROBE-ADDR page=0 vaddr=0x<hex> gpa=0x<hex|none> boot=<id>
 *                          (once, before READY: where page 0 of the memory
 *                           block lives, guest-physical; see below)
 *   FERRY-PROBE-READY mem_mib=<N> rate_mib_s=<R> disk=<DEV|none>
 *       disk_mib=<N> disk_mib_s=<R> boot=<id>                  (one line)
 *   FERRY-PROBE v1 seq=<n> uptime_ms=<ms> mem_mib=<N> rate_mib_s=<R>
 *       pages_written=<n> mem_errors=<n> disk_errors=<n>
 *       disk_written=<n> disk_passes=<n> mem_passes=<n> boot=<id>
 *                                                              (one line)
 *   FERRY-PROBE-ERROR page=<i> ...                            (first 10 only)
 *   FERRY-PROBE-DISK-ERROR block=<b> want_gen=<g> got_gen=<g> reason=<r> ...
 *                                                             (first 10 only)
 *   FERRY-PROBE-DISK-IOERR op=<read|write> block=<b> count=<n> errno=<e> ...
 *                                                             (first 10 only)
 *   FERRY-PROBE-FATAL ...                  (could not start; process exits)
 * New fields are only ever appended to READY and heartbeat lines.  With disk
 * mode off: disk=none disk_mib=0 disk_mib_s=0, disk_written=0 disk_passes=0.
 * disk_written counts 4 KiB blocks written by the rate writer since READY
 * (not the initial fill, not repairs); disk_passes counts completed verify
 * sweeps over the whole region (one every ~10 s for regions up to 160 MiB).
 * mem_passes counts completed verify sweeps over the whole memory block (one
 * every ~5 s): a pass that starts after an event and completes with
 * mem_errors unchanged proves every page was intact after that event.
 * boot=<id> is a random 64-bit number drawn once at probe start (getrandom),
 * printed in decimal so that parsers expecting "key=<digits>" fields keep
 * working: a guest that rebooted (or a cold copy booted elsewhere) shows a
 * new id, whereas a live migration keeps it.
 * The memory block is mlocked and kept out of huge pages and compaction so
 * page 0 stays at the guest-physical address FERRY-PROBE-ADDR printed (read
 * from /proc/self/pagemap; gpa=none if the kernel would not say): tests
 * corrupt it from the host to prove the verifier notices.
 * disk_errors counts blocks found with wrong content plus failed I/O calls.
 * uptime_ms counts from the READY line (after the memory fill), on the
 * guest's CLOCK_MONOTONIC, which does not advance while the VM is paused, so
 * migration downtime is invisible here: time it on the host.  Lines end in
 * "\r\n" on the serial console (tty ONLCR).
 *
 * FERRY_PROBE_CMDLINE_FILE=<path> replaces /proc/cmdline (for host tests;
 * ferry.disk may then name a regular file on a filesystem with O_DIRECT).
 *
 * Build: gcc -O2 -static -o probe probe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h> /* BLKGETSIZE64 */

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

#define DISK_BLOCK 4096u            /* unit of the disk pattern and of I/O */
#define DISK_WORDS (DISK_BLOCK / sizeof(uint64_t))
#define DISK_SWEEP_TICKS 100        /* full disk verify pass every ~10 s... */
#define DISK_SWEEP_MAX 410          /* ...but read at most ~16 MiB/s doing it */
#define DISK_RUN_BLOCKS 16          /* rate writer: runs of up to 64 KiB */
#define DISK_SWEEP_CHUNK 64         /* verifier: reads of up to 256 KiB */
#define DISK_INIT_CHUNK 256         /* initial fill: writes of 1 MiB */
#define DISK_BUF_BLOCKS 256         /* max of the three above */
#define DISK_UNKNOWN 0x80000000u    /* gen flag: content unknown (failed write) */

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
    uint64_t mem_passes;    /* completed verify sweeps over all pages */
    uint64_t seq;
    uint64_t boot_id;       /* random, drawn at start */

    /* Disk mode (disk_fd < 0: off). */
    char disk_dev[256];
    unsigned disk_mib;
    unsigned disk_rate_mib_s;
    int disk_fd;
    uint32_t nblocks;
    uint32_t *disk_gen;     /* expected generation of each block (+ flag) */
    uint64_t *disk_buf;     /* DISK_BUF_BLOCKS blocks, block aligned */
    uint64_t *disk_fix;     /* one block, for repairs during a sweep */
    uint32_t disk_sweep_cursor;
    uint32_t disk_sweep_per_tick;
    uint64_t disk_write_credit;
    uint64_t disk_rng;

    uint64_t disk_errors;
    uint64_t disk_written;
    uint64_t disk_passes;
    unsigned disk_mismatch_reports;
    unsigned disk_ioerr_reports;
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
    char buf[512];
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
    if (++p->sweep_cursor == p->npages) {
        p->sweep_cursor = 0;
        p->mem_passes++;
    }
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

/* ---- identity and placement -------------------------------------------- */

/* A random id for this run of the probe.  getrandom() may block early in boot
 * until the kernel's pool is seeded; never wait for that: an id only has to
 * differ between boots, so fall back to the unseeded pool mixed with clocks. */
static uint64_t draw_boot_id(void)
{
    uint64_t id = 0;
    struct timespec rt, mono;

    if (getrandom(&id, sizeof(id), GRND_NONBLOCK) == (ssize_t)sizeof(id) && id)
        return id;
    if (getrandom(&id, sizeof(id), GRND_INSECURE) != (ssize_t)sizeof(id))
        id = 0;
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    id ^= mix64((uint64_t)rt.tv_sec * 1000000000ULL + (uint64_t)rt.tv_nsec);
    id ^= mix64((uint64_t)mono.tv_nsec ^ ((uint64_t)getpid() << 40));
    return id ? id : 1;
}

/* Keep the memory block where it is in guest-physical memory (tests find it
 * from the host by address): no huge pages, since khugepaged moves pages to
 * collapse them (before the first touch); then locked, so never reclaimed,
 * and locked pages left alone by compaction.  Best effort: each step may be
 * unavailable in a given kernel, and the probe works without them. */
static void avoid_huge_pages(struct probe *p)
{
    madvise(p->mem, (size_t)p->npages * PAGE_SIZE, MADV_NOHUGEPAGE);
}

static void pin_memory(struct probe *p)
{
    /* A system-wide setting: touch it only inside the test guest, never when
     * the probe runs on a host (FERRY_PROBE_CMDLINE_FILE set). */
    int fd = getenv("FERRY_PROBE_CMDLINE_FILE") ? -1
             : open("/proc/sys/vm/compact_unevictable_allowed", O_WRONLY);

    if (fd >= 0) {
        if (write(fd, "0\n", 2) < 0) {
            /* not fatal: the address may then move under compaction */
        }
        close(fd);
    }
    if (mlock(p->mem, (size_t)p->npages * PAGE_SIZE) != 0)
        emit("FERRY-PROBE-WARN mlock failed errno=%s\n",
             strerrorname_np(errno) ? strerrorname_np(errno) : "unknown");
}

/* Guest-physical address of the page holding vaddr, or 0 if unknown (the
 * kernel shows PFNs in pagemap only to CAP_SYS_ADMIN, i.e. root here). */
static uint64_t guest_physical(const void *vaddr)
{
    uint64_t entry = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);

    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)vaddr / PAGE_SIZE) * (off_t)sizeof(entry);
    ssize_t r = pread(fd, &entry, sizeof(entry), off);
    close(fd);
    if (r != (ssize_t)sizeof(entry) || !(entry >> 63)) /* bit 63: present */
        return 0;
    uint64_t pfn = entry & ((1ULL << 55) - 1);        /* bits 0-54 */
    return pfn * PAGE_SIZE + (uintptr_t)vaddr % PAGE_SIZE;
}

static void report_address(struct probe *p)
{
    uint64_t gpa = guest_physical(p->mem);

    if (gpa)
        emit("FERRY-PROBE-ADDR page=0 vaddr=0x%" PRIxPTR " gpa=0x%" PRIx64
             " boot=%" PRIu64 "\n", (uintptr_t)p->mem, gpa, p->boot_id);
    else
        emit("FERRY-PROBE-ADDR page=0 vaddr=0x%" PRIxPTR " gpa=none boot=%" PRIu64
             "\n", (uintptr_t)p->mem, p->boot_id);
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

/* Looks up "key=<string>" as a whole word and copies the value (up to the
 * next blank) to out; returns 0 if absent, empty or too long. */
static int cmdline_str(const char *cmdline, const char *key, char *out,
                       size_t outlen)
{
    size_t klen = strlen(key);

    for (const char *s = cmdline; (s = strstr(s, key)) != NULL; s += klen) {
        if (s != cmdline && s[-1] != ' ')
            continue;
        if (s[klen] != '=')
            continue;
        const char *v = s + klen + 1;
        size_t n = strcspn(v, " \t\n");
        if (n == 0 || n >= outlen)
            return 0;
        memcpy(out, v, n);
        out[n] = '\0';
        return 1;
    }
    return 0;
}

/* ---- disk mode ---------------------------------------------------------- */

/* Each 4 KiB block of the region describes itself (64-bit words, native
 * byte order):
 *   w[0] DISK_MAGIC  w[1] block number  w[2] generation  w[3] checksum
 *   w[4..511] seed + i*WORD_STEP, seed = mix64(block, generation)
 * The checksum covers every word but itself, so a bad block can be told
 * apart: all zero (never reached the disk / lost), bad magic (garbage),
 * bad checksum (torn: parts of different writes), wrong block number
 * (misplaced), wrong generation (stale: an older write; future: a newer one).
 * The expected generation of every block is kept in memory; generation 0 is
 * never written, so a zeroed block can never pass. */
#define DISK_MAGIC 0x4b53445952524546ULL /* "FERRYDSK" in little-endian */
#define DISK_HDR_WORDS 4
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static inline uint64_t disk_seed(uint32_t block, uint32_t gen)
{
    return mix64((((uint64_t)block << 32) | gen) ^ 0x4b534944595252ULL);
}

/* FNV-1a over 64-bit words; the shift-xor lets high bits reach low ones,
 * which a bare multiply never does. */
static inline uint64_t csum_step(uint64_t h, uint64_t w)
{
    h = (h ^ w) * FNV_PRIME;
    return h ^ (h >> 29);
}

static inline uint64_t *disk_blk(uint64_t *buf, uint32_t i)
{
    return buf + (size_t)i * DISK_WORDS;
}

static void disk_fill(uint64_t *w, uint32_t block, uint32_t gen)
{
    uint64_t v = disk_seed(block, gen);
    uint64_t h = FNV_OFFSET;

    w[0] = DISK_MAGIC;
    w[1] = block;
    w[2] = gen;
    h = csum_step(h, w[0]);
    h = csum_step(h, w[1]);
    h = csum_step(h, w[2]);
    for (unsigned i = DISK_HDR_WORDS; i < DISK_WORDS; i++) {
        w[i] = v + i * WORD_STEP;
        h = csum_step(h, w[i]);
    }
    w[3] = h;
}

/* NULL if the block holds exactly (block, gen), else why not. */
static const char *disk_check(const uint64_t *w, uint32_t block, uint32_t gen)
{
    uint64_t v = disk_seed(block, gen);
    uint64_t diff = (w[0] ^ DISK_MAGIC) | (w[1] ^ block) | (w[2] ^ gen);
    uint64_t any = w[0] | w[1] | w[2] | w[3];
    uint64_t h = FNV_OFFSET;

    h = csum_step(h, w[0]);
    h = csum_step(h, w[1]);
    h = csum_step(h, w[2]);
    for (unsigned i = DISK_HDR_WORDS; i < DISK_WORDS; i++) {
        diff |= w[i] ^ (v + i * WORD_STEP);
        any |= w[i];
        h = csum_step(h, w[i]);
    }
    if (!diff && h == w[3])
        return NULL;
    if (!any)
        return "zero";
    if (w[0] != DISK_MAGIC)
        return "magic";
    if (h != w[3])
        return "torn";
    if (w[1] != block)
        return "misplaced";
    if (w[2] < gen)
        return "stale";
    if (w[2] > gen)
        return "future";
    return "payload"; /* consistent block, wrong data: checksum collision */
}

/* One pread/pwrite of count blocks at block `block`; retries EINTR and
 * continues short transfers.  A failure is counted and reported. */
static int disk_pio(struct probe *p, int wr, uint64_t *buf, uint32_t block,
                    uint32_t count, const char *during)
{
    size_t len = (size_t)count * DISK_BLOCK, done = 0;
    off_t off = (off_t)block * DISK_BLOCK;

    while (done < len) {
        ssize_t r = wr ? pwrite(p->disk_fd, (char *)buf + done, len - done,
                                off + (off_t)done)
                       : pread(p->disk_fd, (char *)buf + done, len - done,
                               off + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? errno : 0;
            const char *name = e ? strerrorname_np(e) : NULL;

            p->disk_errors++;
            if (++p->disk_ioerr_reports <= MAX_ERROR_REPORTS)
                emit("FERRY-PROBE-DISK-IOERR op=%s block=%" PRIu32
                     " count=%" PRIu32 " errno=%s done=%zu during=%s\n",
                     wr ? "write" : "read", block, count,
                     name ? name : (e ? "unknown" : "short"), done, during);
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

static void disk_report(struct probe *p, const uint64_t *w, uint32_t block,
                        const char *reason, const char *during)
{
    p->disk_errors++;
    if (++p->disk_mismatch_reports > MAX_ERROR_REPORTS)
        return;
    emit("FERRY-PROBE-DISK-ERROR block=%" PRIu32 " want_gen=%" PRIu32
         " got_gen=%" PRIu64 " reason=%s got_block=%" PRIu64
         " got_magic=0x%016" PRIx64 " during=%s\n",
         block, p->disk_gen[block] & ~DISK_UNKNOWN, w[2], reason, w[1], w[0],
         during);
}

/* Rewrite blocks [start, start+count) with their next generation, verifying
 * first what is there (unless unknown after a failed write).  A block found
 * bad is reported and, being rewritten, repaired.  Uses buf (count blocks).
 * Returns the number of blocks written. */
static uint32_t disk_rewrite(struct probe *p, uint64_t *buf, uint32_t start,
                             uint32_t count, const char *during)
{
    uint32_t *g = p->disk_gen + start;
    int verify = 0;

    for (uint32_t i = 0; i < count; i++)
        verify |= !(g[i] & DISK_UNKNOWN);
    if (verify && disk_pio(p, 0, buf, start, count, during) == 0) {
        for (uint32_t i = 0; i < count; i++) {
            if (g[i] & DISK_UNKNOWN)
                continue;
            const char *why = disk_check(disk_blk(buf, i), start + i, g[i]);
            if (why)
                disk_report(p, disk_blk(buf, i), start + i, why, during);
        }
    }
    for (uint32_t i = 0; i < count; i++)
        disk_fill(disk_blk(buf, i), start + i, (g[i] & ~DISK_UNKNOWN) + 1);
    int failed = disk_pio(p, 1, buf, start, count, during) != 0;
    /* After a failed write the blocks may hold the old or the new data (or
     * a mix): skip verifying them until a write succeeds. */
    for (uint32_t i = 0; i < count; i++)
        g[i] = ((g[i] & ~DISK_UNKNOWN) + 1) | (failed ? DISK_UNKNOWN : 0);
    return failed ? 0 : count;
}

static inline uint64_t disk_random(struct probe *p)
{
    /* xorshift64* */
    p->disk_rng ^= p->disk_rng >> 12;
    p->disk_rng ^= p->disk_rng << 25;
    p->disk_rng ^= p->disk_rng >> 27;
    return p->disk_rng * 0x2545f4914f6cdd1dULL;
}

/* Rate writer: R MiB/s as runs of up to DISK_RUN_BLOCKS blocks starting at
 * random blocks, so writes land all over the region, both behind and ahead
 * of a mirror job's copy cursor. */
static void disk_write_tick(struct probe *p)
{
    p->disk_write_credit += (uint64_t)p->disk_rate_mib_s * PAGES_PER_MIB;
    uint64_t n = p->disk_write_credit / TICKS_PER_SEC;
    p->disk_write_credit %= TICKS_PER_SEC;

    while (n > 0) {
        uint32_t start = (uint32_t)(disk_random(p) % p->nblocks);
        uint32_t count = DISK_RUN_BLOCKS;
        if (count > n)
            count = (uint32_t)n;
        if (count > p->nblocks - start)
            count = p->nblocks - start;
        p->disk_written += disk_rewrite(p, p->disk_buf, start, count, "write");
        n -= count;
    }
}

/* Verifier: the next n blocks of a round-robin sweep, in large reads. */
static void disk_sweep_tick(struct probe *p, uint32_t n)
{
    while (n > 0) {
        uint32_t start = p->disk_sweep_cursor;
        uint32_t count = DISK_SWEEP_CHUNK;
        if (count > n)
            count = n;
        if (count > p->nblocks - start)
            count = p->nblocks - start;

        /* A failed read is counted; the blocks are simply tried again on
         * the next pass. */
        if (disk_pio(p, 0, p->disk_buf, start, count, "sweep") == 0) {
            for (uint32_t i = 0; i < count; i++) {
                uint32_t b = start + i;
                uint64_t *w = disk_blk(p->disk_buf, i);
                if (p->disk_gen[b] & DISK_UNKNOWN) {
                    /* an earlier write failed: try again to resynchronise */
                    disk_rewrite(p, p->disk_fix, b, 1, "sweep");
                    continue;
                }
                const char *why = disk_check(w, b, p->disk_gen[b]);
                if (why) {
                    disk_report(p, w, b, why, "sweep");
                    /* Rewrite it (next generation, no second check), so
                     * one corruption is counted once. */
                    p->disk_gen[b] |= DISK_UNKNOWN;
                    disk_rewrite(p, p->disk_fix, b, 1, "sweep");
                }
            }
        }
        n -= count;
        p->disk_sweep_cursor += count;
        if (p->disk_sweep_cursor == p->nblocks) {
            p->disk_sweep_cursor = 0;
            p->disk_passes++;
        }
    }
}

/* Opens the device and sizes the region; then writes generation 1 to every
 * block (the device may hold anything, including an earlier boot's data). */
static void disk_setup(struct probe *p)
{
    struct stat st;
    uint64_t size = 0;

    p->disk_fd = open(p->disk_dev, O_RDWR | O_DIRECT | O_SYNC);
    if (p->disk_fd < 0) {
        emit("FERRY-PROBE-FATAL cannot open disk=%s errno=%s\n", p->disk_dev,
             strerrorname_np(errno) ? strerrorname_np(errno) : "unknown");
        exit(1);
    }
    if (fstat(p->disk_fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        if (ioctl(p->disk_fd, BLKGETSIZE64, &size) != 0)
            size = 0;
    } else if (fstat(p->disk_fd, &st) == 0) {
        size = (uint64_t)st.st_size; /* a regular file, on a host */
    }
    uint64_t dev_mib = size >> 20;
    if (dev_mib > MAX_MIB)
        dev_mib = MAX_MIB;
    if (dev_mib == 0) {
        emit("FERRY-PROBE-FATAL disk=%s too small size=%" PRIu64 "\n",
             p->disk_dev, size);
        exit(1);
    }
    if (p->disk_mib == 0 || p->disk_mib > dev_mib)
        p->disk_mib = (unsigned)dev_mib;
    p->nblocks = p->disk_mib * PAGES_PER_MIB;

    p->disk_gen = calloc(p->nblocks, sizeof(*p->disk_gen));
    if (!p->disk_gen
        || posix_memalign((void **)&p->disk_buf, DISK_BLOCK,
                          (size_t)DISK_BUF_BLOCKS * DISK_BLOCK)
        || posix_memalign((void **)&p->disk_fix, DISK_BLOCK, DISK_BLOCK)) {
        emit("FERRY-PROBE-FATAL cannot allocate disk buffers\n");
        exit(1);
    }

    p->disk_sweep_per_tick = (p->nblocks + DISK_SWEEP_TICKS - 1) / DISK_SWEEP_TICKS;
    if (p->disk_sweep_per_tick > DISK_SWEEP_MAX)
        p->disk_sweep_per_tick = DISK_SWEEP_MAX;
    p->disk_rng = (uint64_t)now_ns() | 1;

    int64_t t0 = now_ns();
    for (uint32_t b = 0; b < p->nblocks; b += DISK_INIT_CHUNK) {
        uint32_t count = p->nblocks - b < DISK_INIT_CHUNK ? p->nblocks - b
                                                          : DISK_INIT_CHUNK;
        for (uint32_t i = 0; i < count; i++)
            disk_fill(disk_blk(p->disk_buf, i), b + i, 1);
        if (disk_pio(p, 1, p->disk_buf, b, count, "init")) {
            emit("FERRY-PROBE-FATAL cannot initialise disk=%s\n", p->disk_dev);
            exit(1);
        }
        for (uint32_t i = 0; i < count; i++)
            p->disk_gen[b + i] = 1;
    }
    emit("FERRY-PROBE-DISK-INIT done=%" PRIu32 " ms=%" PRId64 "\n", p->nblocks,
         (now_ns() - t0) / 1000000);
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

    p->disk_fd = -1;
    if (cmdline_str(cmdline, "ferry.disk", p->disk_dev, sizeof(p->disk_dev))) {
        p->disk_mib = cmdline_uint(cmdline, "ferry.disk_mib", 0, MAX_MIB);
        p->disk_rate_mib_s = cmdline_uint(cmdline, "ferry.disk_mib_s", 0, 1u << 20);
    } else {
        strcpy(p->disk_dev, "none");
    }
}

int main(void)
{
    struct probe p = { 0 };

    p.boot_id = draw_boot_id();
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
    avoid_huge_pages(&p);
    /* Touching everything up front makes the whole block resident and
     * non-zero, so migration has to transfer all of it. */
    for (uint32_t i = 0; i < p.npages; i++)
        fill_page(&p, i, 0);
    pin_memory(&p);
    report_address(&p);

    if (strcmp(p.disk_dev, "none") != 0)
        disk_setup(&p);

    uint32_t sweep_per_tick = (p.npages + SWEEP_PERIOD_TICKS - 1) / SWEEP_PERIOD_TICKS;
    int64_t start = now_ns();
    int64_t next_tick = start + TICK_NS;
    int64_t next_report = start + REPORT_NS;

    emit("FERRY-PROBE-READY mem_mib=%u rate_mib_s=%u disk=%s disk_mib=%u"
         " disk_mib_s=%u boot=%" PRIu64 "\n", p.mem_mib, p.rate_mib_s, p.disk_dev,
         p.disk_mib, p.disk_rate_mib_s, p.boot_id);

    for (;;) {
        int64_t now = now_ns();

        if (now >= next_tick) {
            tick(&p, sweep_per_tick);
            if (p.disk_fd >= 0) {
                disk_write_tick(&p);
                disk_sweep_tick(&p, p.disk_sweep_per_tick);
            }
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
                 " mem_errors=%" PRIu64 " disk_errors=%" PRIu64
                 " disk_written=%" PRIu64 " disk_passes=%" PRIu64
                 " mem_passes=%" PRIu64 " boot=%" PRIu64 "\n",
                 ++p.seq, (now - start) / 1000000, p.mem_mib, p.rate_mib_s,
                 p.pages_written, p.mem_errors, p.disk_errors, p.disk_written,
                 p.disk_passes, p.mem_passes, p.boot_id);
            next_report += REPORT_NS;
            if (next_report <= now) /* stalled > 1 s: no burst of lines */
                next_report = now + REPORT_NS;
        }

        if (now >= next_tick)
            continue;

        sleep_until(next_tick < next_report ? next_tick : next_report);
    }
}
