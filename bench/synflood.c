/* The director bench's fast SYN sender: sends a pool of prebuilt IPv4 packets through a raw
 * socket with sendmmsg, as fast as one core can, for a time. Built by bench/director_bench.py
 * with the system's cc; the Python sender (one sendto per packet) cannot reach the kernel token
 * map's rate, so without this the bench would measure its own generator.
 *
 * usage: synflood POOLFILE DST SECONDS   (POOLFILE: packets, each preceded by a 2-byte length,
 * big-endian). Prints "flood started", then one JSON line {sent, errors, start, end} with
 * CLOCK_MONOTONIC seconds (the orchestrator's clock).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s POOLFILE DST SECONDS\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror("pool"); return 1; }
    static unsigned char buf[1 << 24];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    size_t cap = 1 << 16, n = 0;
    struct iovec *iov = calloc(cap, sizeof *iov);
    for (size_t off = 0; off + 2 <= len && n < cap;) {
        size_t plen = (buf[off] << 8) | buf[off + 1];
        iov[n].iov_base = buf + off + 2;
        iov[n].iov_len = plen;
        n++;
        off += 2 + plen;
    }
    if (n == 0) { fprintf(stderr, "empty pool\n"); return 1; }
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("socket"); return 1; }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_in dst = {.sin_family = AF_INET};
    inet_pton(AF_INET, argv[2], &dst.sin_addr);
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    double seconds = atof(argv[3]);
    printf("flood started\n");
    fflush(stdout);
    double start = now(), end = start + seconds, t = start;
    unsigned long long sent = 0, errors = 0, next = 0;
    while (t < end) {
        for (int round = 0; round < 16; round++) {
            for (int i = 0; i < BATCH; i++) {
                msgs[i].msg_hdr.msg_iov = &iov[(next + i) % n];
            }
            int r = sendmmsg(fd, msgs, BATCH, 0);
            if (r < 0) {
                errors += BATCH;  /* ENOBUFS: the kernel could not take them */
            } else {
                sent += r;
                errors += BATCH - r;
            }
            next += BATCH;
        }
        t = now();
    }
    printf("{\"sent\": %llu, \"errors\": %llu, \"start\": %.6f, \"end\": %.6f}\n", sent, errors, start, t);
    return 0;
}
