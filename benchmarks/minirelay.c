/* The smallest useful UDP tunnel relay: the physical limit benchmarks/relay.py compares to.
 *
 *   minirelay A_LPORT A_PEER B_LPORT B_PEER SECONDS [PCAP]
 *
 * Two sockets on 127.0.0.1, each bound to its LPORT and connect()ed to its PEER port, like a
 * tunnelscope bridge's endpoints (4 MiB buffers). One epoll loop, level-triggered: a readable
 * socket gives one recvmmsg of up to 64 datagrams, sent on with one sendmmsg to the other side;
 * a full batch is followed by another before epoll is asked again. No impairment, no capture,
 * no copy. With PCAP, every frame received is also written to that pcap file (Ethernet,
 * microseconds): one writev per batch of (record header, frame) pairs straight from the receive
 * slots, the least a capturing relay can do. Runs SECONDS (or until SIGTERM/SIGINT), then
 * prints "forwarded A2B B2A" and exits.
 * Built by benchmarks/relay.py with `gcc -O2`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define SLOT 65536
#define BUFFER (4 << 20)

static volatile sig_atomic_t stopping;

static void on_signal(int signum) { (void)signum; stopping = 1; }

static int open_end(int lport, int peer)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    int size = BUFFER;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons((unsigned short)lport);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return -1;
    addr.sin_port = htons((unsigned short)peer);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return -1;
    return fd;
}

/* The pcap file header: version 2.4, snaplen 262144, Ethernet. */
static int open_pcap(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint32_t header[6] = {0xa1b2c3d4, 2 | (4u << 16), 0, 0, 262144, 1};
    if (fd >= 0 && write(fd, header, sizeof header) != (ssize_t)sizeof header)
        return -1;
    return fd;
}

/* One writev of the batch's records: a 16-byte header, then the frame in its slot. */
static void write_records(int fd, struct mmsghdr *msgs, struct iovec *iov, int n)
{
    static uint32_t headers[BATCH][4];
    static struct iovec out[2 * BATCH];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    for (int j = 0; j < n; j++) {
        headers[j][0] = (uint32_t)ts.tv_sec;
        headers[j][1] = (uint32_t)(ts.tv_nsec / 1000);
        headers[j][2] = headers[j][3] = msgs[j].msg_len;
        out[2 * j].iov_base = headers[j];
        out[2 * j].iov_len = sizeof headers[j];
        out[2 * j + 1] = iov[j];
    }
    (void)!writev(fd, out, 2 * n);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: minirelay A_LPORT A_PEER B_LPORT B_PEER SECONDS [PCAP]\n");
        return 2;
    }
    int fds[2] = {open_end(atoi(argv[1]), atoi(argv[2])), open_end(atoi(argv[3]), atoi(argv[4]))};
    if (fds[0] < 0 || fds[1] < 0) {
        perror("minirelay: socket");
        return 1;
    }
    int pcap = argc == 7 ? open_pcap(argv[6]) : -1;
    if (argc == 7 && pcap < 0) {
        perror("minirelay: pcap");
        return 1;
    }
    double end = now() + atof(argv[5]);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    static unsigned char buffers[BATCH][SLOT];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long long forwarded[2] = {0, 0};
    int ep = epoll_create1(0);
    for (int side = 0; side < 2; side++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)side};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[side], &ev);
    }
    while (!stopping) {
        double left = end - now();
        if (left <= 0)
            break;
        struct epoll_event events[2];
        int n = epoll_wait(ep, events, 2, left > 0.2 ? 200 : (int)(left * 1000) + 1);
        for (int i = 0; i < n; i++) {
            int side = (int)events[i].data.u32;
            int got;
            do {
                for (int j = 0; j < BATCH; j++) {
                    iov[j].iov_base = buffers[j];
                    iov[j].iov_len = SLOT;
                    memset(&msgs[j].msg_hdr, 0, sizeof msgs[j].msg_hdr);
                    msgs[j].msg_hdr.msg_iov = &iov[j];
                    msgs[j].msg_hdr.msg_iovlen = 1;
                }
                got = recvmmsg(fds[side], msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                for (int j = 0; j < got; j++)
                    iov[j].iov_len = msgs[j].msg_len;
                if (pcap >= 0)
                    write_records(pcap, msgs, iov, got);
                int sent = sendmmsg(fds[1 - side], msgs, (unsigned)got, MSG_DONTWAIT);
                if (sent > 0)
                    forwarded[side] += (unsigned long long)sent;
            } while (got == BATCH);
        }
    }
    printf("forwarded %llu %llu\n", forwarded[0], forwarded[1]);
    return 0;
}
