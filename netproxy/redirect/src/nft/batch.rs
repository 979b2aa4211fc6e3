//! An nf_tables transaction: messages between NFNL_MSG_BATCH_BEGIN and
//! NFNL_MSG_BATCH_END, committed by the kernel all together or not at all.
//! Each message remembers what it does, so a refusal names the step.

use crate::Error;
use crate::netlink::msg::{Builder, NLM_F_ACK, NLM_F_REQUEST};
use crate::netlink::{Ack, Socket};

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
/// The family of the `inet` table.
const NFPROTO_INET: u8 = 1;

/// `enum nf_tables_msg_types` values used here.
#[derive(Clone, Copy)]
pub(crate) enum Cmd {
    NewTable = 0,
    DelTable = 2,
    NewChain = 3,
    NewRule = 6,
    NewSet = 9,
    NewSetElem = 12,
}

pub(crate) struct Batch<'s> {
    sock: &'s mut Socket,
    b: Builder,
    /// Sequence number and description of each message inside the batch.
    ops: Vec<(u32, String)>,
}

/// `struct nfgenmsg`: family, version 0, resource id (big-endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

impl<'s> Batch<'s> {
    pub fn new(sock: &'s mut Socket) -> Batch<'s> {
        let mut b = Builder::default();
        let seq = sock.next_seq();
        b.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            &nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES),
        );
        b.end();
        Batch {
            sock,
            b,
            ops: Vec::new(),
        }
    }

    /// Adds one message for the `inet` family; `what` names it in errors.
    pub fn add(&mut self, cmd: Cmd, flags: u16, what: String, attrs: impl FnOnce(&mut Builder)) {
        let seq = self.sock.next_seq();
        self.b.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd as u16,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            &nfgenmsg(NFPROTO_INET, 0),
        );
        attrs(&mut self.b);
        self.b.end();
        self.ops.push((seq, what));
    }

    /// Sends the batch; the first refused message becomes the error.
    pub fn commit(mut self, what: &str) -> Result<(), Error> {
        let seq = self.sock.next_seq();
        self.b.begin(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            &nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES),
        );
        self.b.end();
        let expect: Vec<u32> = self.ops.iter().map(|(s, _)| *s).collect();
        let acks = self.sock.transact(what, &self.b, &expect)?;
        if let Some(ack) = acks.iter().find(|a| a.errno != 0) {
            return Err(self.describe(ack, what));
        }
        Ok(())
    }

    fn describe(&self, ack: &Ack, what: &str) -> Error {
        let step = self
            .ops
            .iter()
            .find(|(s, _)| *s == ack.seq)
            .map(|(_, w)| format!("{what}: {w}"))
            .unwrap_or_else(|| format!("{what} (nf_tables batch)"));
        ack.error(&step, self.sock.netns())
    }
}
