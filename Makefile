# husk: `make` builds the binaries (release) and the guest kernel and
# initramfs; `make install` installs them for containerd
# (scripts/install.sh: PREFIX, DESTDIR, HUSK_DATA_DIR, HUSK_CONF_DIR) and
# prints the containerd config stanza; `make test` runs what CI runs.

PREFIX ?= /usr/local
export PREFIX DESTDIR

.PHONY: all build guest install test

all: build guest

build:
	cargo build --release --bins

guest:
	mkdir -p target/husk
	bash scripts/build-guest.sh > target/husk/guest.env.tmp
	mv target/husk/guest.env.tmp target/husk/guest.env

install:
	@if [ -f target/husk/guest.env ]; then . target/husk/guest.env; fi; \
		bash scripts/install.sh

test:
	bash tests/run.sh
