// SPDX-License-Identifier: GPL-3.0-or-later
// New-connection rate for bench/services_datapath.py (not BPF: a host program built beside the
// benchmarks' BPF fixtures), in the manner of netperf's TCP_CRR: one connection after the other,
// each one connect, a 1-byte request, the 1-byte response, close. The server closes first; the client
// then closes with SO_LINGER 0 (a RST), so that neither side keeps the connection in TIME_WAIT and the
// client never runs out of source ports. No statistics here: the client prints every connection's
// time and bench/services_datapath.py computes the percentiles with bench/benchlib.py.
//
//   conn_rate server PORT COUNT                    listens on PORT .. PORT+COUNT-1 (one epoll over all),
//                                                  prints "ready"; serves one connection at a time
//   conn_rate client ADDR PORT SECONDS WARMUP [SERVER_PID]
//                                                  WARMUP connections first (not recorded), then
//                                                  connections for SECONDS; prints "conn_rate 1 <count>
//                                                  <elapsed_ns> <client_cpu_ns> <server_cpu_ns>" and then
//                                                  one connection time in ns per line (connect to close)
//
// client_cpu_ns and server_cpu_ns: the CPU time the client and the server process (SERVER_PID, -1 when
// not given) ran during the timed connections, from the first field of /proc/<pid>/schedstat
// (sum_exec_runtime). Without CONFIG_IRQ_TIME_ACCOUNTING (this machine's kernel) that includes the
// softirq work done in their context, which for veth paths is the whole datapath of their packets
// (the sender's transmit runs the receiver's side up to its socket); other processes' work on the
// CPU is not in it, so it is a cost per connection that load on a shared machine hardly moves.
//
// The client stops at the first failure (exit 1, the connection's number and the error on stderr):
// a refused or timed-out connection means the path is broken, not slow. Each connect and read times
// out after 3 s (SO_SNDTIMEO, SO_RCVTIMEO) so a broken path cannot hang the benchmark.
//
// Build: clang -O2 -o conn_rate conn_rate.c (clang, from requirements/apt.txt, brings libc6-dev)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 4096

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* sum_exec_runtime of a process in ns (first field of /proc/<pid>/schedstat); -1 when unreadable */
static long long cpu_ns(const char *pid)
{
	char path[64];
	long long ns = -1;
	FILE *f;
	snprintf(path, sizeof(path), "/proc/%s/schedstat", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%lld", &ns) != 1)
		ns = -1;
	fclose(f);
	return ns;
}

static int fail(const char *what)
{
	fprintf(stderr, "conn_rate: %s: %s\n", what, strerror(errno));
	return 1;
}

static int serve(int port, int count)
{
	int one = 1;
	int ep = epoll_create1(0);
	if (ep < 0)
		return fail("epoll_create1");
	if (count < 1 || count > MAX_PORTS || port < 1 || port + count - 1 > 65535) {
		fprintf(stderr, "conn_rate: ports %d..%d out of range (1..65535, at most %d)\n", port, port + count - 1,
			MAX_PORTS);
		return 2;
	}
	for (int i = 0; i < count; i++) {
		struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port + i),
					   .sin_addr.s_addr = htonl(INADDR_ANY)};
		struct epoll_event ev = {.events = EPOLLIN};
		int lfd = socket(AF_INET, SOCK_STREAM, 0);
		if (lfd < 0)
			return fail("socket");
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
			return fail("bind");
		if (listen(lfd, 128) < 0)
			return fail("listen");
		ev.data.fd = lfd;
		if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
			return fail("epoll_ctl");
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		struct epoll_event events[16];
		int n = epoll_wait(ep, events, 16, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			char byte;
			int fd = accept(events[i].data.fd, NULL, NULL);
			if (fd < 0)
				continue; /* the client reset it already: nothing to serve */
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			if (read(fd, &byte, 1) == 1)
				(void)!write(fd, &byte, 1);
			close(fd);
		}
	}
}

/* One connection: connect, 1-byte request, 1-byte response, close with a RST. 0 or -1 (errno set). */
static int one_connection(const struct sockaddr_in *addr, const char **what)
{
	static const struct timeval timeout = {.tv_sec = 3};
	static const struct linger reset = {.l_onoff = 1, .l_linger = 0};
	int one = 1, ret = -1;
	char byte = 'x';
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		*what = "socket";
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
		*what = "connect";
	else if (write(fd, &byte, 1) != 1)
		*what = "request";
	else if (read(fd, &byte, 1) != 1)
		*what = errno ? "response" : "response (connection closed)";
	else
		ret = 0;
	int saved = errno;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
	close(fd);
	errno = saved;
	return ret;
}

static int client(const char *host, int port, double seconds, long warmup, const char *server_pid)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
	size_t cap = 1 << 16, n = 0;
	uint64_t *lat = malloc(cap * sizeof(*lat));
	const char *what = "";
	char msg[96];
	if (!lat)
		return fail("malloc");
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "conn_rate: %s is not an IPv4 address\n", host);
		return 1;
	}
	for (long i = 0; i < warmup; i++) {
		errno = 0;
		if (one_connection(&addr, &what) < 0) {
			snprintf(msg, sizeof(msg), "warm-up connection %ld: %s", i + 1, what);
			return fail(msg);
		}
	}
	long long client0 = cpu_ns("self"), server0 = server_pid ? cpu_ns(server_pid) : -1;
	uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), t0 = start, t1;
	do {
		errno = 0;
		if (one_connection(&addr, &what) < 0) {
			snprintf(msg, sizeof(msg), "connection %zu: %s", n + 1, what);
			return fail(msg);
		}
		t1 = now_ns();
		if (n == cap) {
			cap *= 2;
			lat = realloc(lat, cap * sizeof(*lat));
			if (!lat)
				return fail("realloc");
		}
		lat[n++] = t1 - t0;
		t0 = t1;
	} while (t1 < end);
	long long client1 = cpu_ns("self"), server1 = server_pid ? cpu_ns(server_pid) : -1;
	printf("conn_rate 1 %zu %llu %lld %lld\n", n, (unsigned long long)(t1 - start),
	       client0 < 0 || client1 < 0 ? -1 : client1 - client0, server0 < 0 || server1 < 0 ? -1 : server1 - server0);
	for (size_t i = 0; i < n; i++)
		printf("%llu\n", (unsigned long long)lat[i]);
	return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "server") == 0)
		return serve(atoi(argv[2]), atoi(argv[3]));
	if ((argc == 6 || argc == 7) && strcmp(argv[1], "client") == 0)
		return client(argv[2], atoi(argv[3]), atof(argv[4]), atol(argv[5]), argc == 7 ? argv[6] : NULL);
	fprintf(stderr, "usage: conn_rate server PORT COUNT | conn_rate client ADDR PORT SECONDS WARMUP [SERVER_PID]\n");
	return 2;
}
