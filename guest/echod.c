/*
 * echod.c - Ferry test-guest echo server.
 *
 * Lets a client outside the guest see what a migration looks like from the
 * network: every UDP datagram is sent straight back, and every TCP connection
 * gets its byte stream echoed back in order.  The host's echo client
 * (ferry/lab/echo.py) measures the gap in UDP replies around a switchover and
 * checks that its TCP stream survives byte for byte.
 *
 * Usage: echod [PORT]          (default 7; IPv4, all addresses)
 *
 * One thread, one poll() loop.  Many TCP connections at once: sockets are
 * non-blocking and each connection has its own buffer, so a client that reads
 * slowly only stops its own connection from being read (its buffer is full),
 * never the others or UDP.
 *
 * Output lines (stable interface, on stdout, which init points at the serial
 * console):
 *   FERRY-ECHO-READY udp=<port> tcp=<port>   (once, when both are listening)
 *   FERRY-ECHO-FATAL <what>: <strerror>      (could not start; exits 1)
 *
 * Build: gcc -O2 -static -Wall -Wextra -o echod echod.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 64
#define CONN_BUF 65536
#define UDP_BURST 64 /* datagrams per wakeup, so TCP is served too */

struct conn {
    int fd;            /* -1: slot free */
    int eof;           /* peer finished sending: close once drained */
    size_t len;        /* bytes buffered, not yet echoed */
    char buf[CONN_BUF];
};

static struct conn conns[MAX_CONNS];

static void fatal(const char *what)
{
    printf("FERRY-ECHO-FATAL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static int listen_socket(int type, int port)
{
    struct sockaddr_in addr;
    int one = 1;
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0)
        fatal("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons((unsigned short)port);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        fatal(type == SOCK_DGRAM ? "bind udp" : "bind tcp");
    if (type == SOCK_STREAM && listen(fd, 16) < 0)
        fatal("listen");
    return fd;
}

static void conn_close(struct conn *c)
{
    close(c->fd);
    c->fd = -1;
    c->eof = 0;
    c->len = 0;
}

static void serve_udp(int fd)
{
    char buf[2048];
    struct sockaddr_in peer;
    socklen_t plen;
    ssize_t n;
    int i;

    for (i = 0; i < UDP_BURST; i++) {
        plen = sizeof(peer);
        n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);
        if (n < 0)
            return; /* EAGAIN, or an ICMP error queued on the socket */
        /* A full send buffer drops the reply, as a lost packet would. */
        sendto(fd, buf, (size_t)n, MSG_DONTWAIT, (struct sockaddr *)&peer, plen);
    }
}

static void accept_all(int lfd)
{
    int fd, i, one = 1;

    for (;;) {
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        for (i = 0; i < MAX_CONNS && conns[i].fd >= 0; i++)
            ;
        if (i == MAX_CONNS) {
            close(fd); /* full: the client sees a reset, not a hang */
            continue;
        }
        /* Echo each chunk at once instead of letting Nagle batch it. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        conns[i].fd = fd;
    }
}

/* Write out what is buffered; returns -1 if the connection is dead. */
static int conn_flush(struct conn *c)
{
    ssize_t n;

    while (c->len > 0) {
        n = send(c->fd, c->buf, c->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        memmove(c->buf, c->buf + n, c->len - (size_t)n);
        c->len -= (size_t)n;
    }
    return 0;
}

static void serve_conn(struct conn *c, short revents)
{
    ssize_t n;

    if (revents & POLLIN) {
        n = recv(c->fd, c->buf + c->len, CONN_BUF - c->len, MSG_DONTWAIT);
        if (n > 0)
            c->len += (size_t)n;
        else if (n == 0)
            c->eof = 1;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_close(c);
            return;
        }
    } else if (revents & (POLLERR | POLLHUP)) {
        /* Nothing left to read and the peer is gone: a reset or error. */
        conn_close(c);
        return;
    }
    if (conn_flush(c) < 0 || (c->eof && c->len == 0))
        conn_close(c);
}

int main(int argc, char **argv)
{
    struct pollfd pfd[2 + MAX_CONNS];
    int slot[2 + MAX_CONNS];
    int port = argc > 1 ? atoi(argv[1]) : 7;
    int udp, tcp, i, n;

    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: echod [PORT]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    for (i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    udp = listen_socket(SOCK_DGRAM, port);
    tcp = listen_socket(SOCK_STREAM, port);
    printf("FERRY-ECHO-READY udp=%d tcp=%d\n", port, port);
    fflush(stdout);

    for (;;) {
        pfd[0].fd = udp;
        pfd[0].events = POLLIN;
        pfd[1].fd = tcp;
        pfd[1].events = POLLIN;
        n = 2;
        for (i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0)
                continue;
            pfd[n].fd = c->fd;
            /* Read only while there is room: a slow reader backs up its own
             * sender through TCP flow control, nobody else's. */
            pfd[n].events = (short)((c->len < CONN_BUF && !c->eof ? POLLIN : 0) |
                                    (c->len > 0 ? POLLOUT : 0));
            slot[n] = i;
            n++;
        }
        if (poll(pfd, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            fatal("poll");
        }
        if (pfd[0].revents)
            serve_udp(udp);
        if (pfd[1].revents)
            accept_all(tcp);
        for (i = 2; i < n; i++)
            if (pfd[i].revents)
                serve_conn(&conns[slot[i]], pfd[i].revents);
    }
}
