// Guest-side helper for tests/qemu_vsock.rs, built with `gcc -static` into a test initramfs.
//   vs server PORT      echo server on vsock PORT (one child per connection); prints VS-ECHOED n
//   vs client PORT MSG  connect to the host (CID 2) PORT, send MSG, half-close, print the reply
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>
int main(int argc, char **argv) {
  if (argc >= 3 && !strcmp(argv[1], "server")) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = atoi(argv[2]), .svm_cid = VMADDR_CID_ANY};
    if (bind(s, (void*)&a, sizeof a) || listen(s, 16)) { perror("bind/listen"); return 1; }
    printf("VS-LISTENING %s\n", argv[2]); fflush(stdout);
    for (;;) {
      int c = accept(s, 0, 0);
      if (c < 0) { perror("accept"); continue; }
      if (fork() == 0) {
        char buf[65536]; ssize_t n; long tot = 0;
        while ((n = read(c, buf, sizeof buf)) > 0) {
          tot += n;
          char *p = buf; while (n > 0) { ssize_t w = write(c, p, n); if (w <= 0) { perror("write"); _exit(1);} p += w; n -= w; }
        }
        printf("VS-ECHOED %ld\n", tot); fflush(stdout);
        close(c); _exit(0);
      }
      close(c);
    }
  }
  if (argc >= 4 && !strcmp(argv[1], "client")) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = atoi(argv[2]), .svm_cid = 2};
    if (connect(s, (void*)&a, sizeof a)) { perror("VS-CLIENT connect"); return 1; }
    write(s, argv[3], strlen(argv[3]));
    shutdown(s, SHUT_WR);
    char buf[256]; ssize_t n, t = 0;
    while ((n = read(s, buf + t, sizeof buf - 1 - t)) > 0) t += n;
    buf[t] = 0;
    printf("VS-CLIENT got: %s\n", buf); fflush(stdout);
    close(s); return 0;
  }
  return 2;
}
