//! The engine loop's commands, in the order they were sent, except that a
//! first token goes ahead of the commands waiting before it.
//!
//! The KV receiver announces a transfer's first token as soon as its Final
//! frame lands, often while Layer frames that arrived before it still wait
//! to be imported (each import copies a frame into the cache on the engine
//! thread: a 4k prompt of an 8B model is ~100 ms of them). Nothing waiting
//! depends on the first token, and everything that depends on it (its
//! transfer's `KvComplete`) was sent after it, so taking it first keeps every
//! order that matters and streams the token at once.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use super::Command;

/// The loop's end of its command channel.
pub(crate) struct Inbox {
    rx: Receiver<Command>,
    /// First tokens taken from the channel, not yet handed out.
    first_tokens: VecDeque<Command>,
    /// The other commands taken from the channel, not yet handed out.
    waiting: VecDeque<Command>,
}

impl Inbox {
    pub(crate) fn new(rx: Receiver<Command>) -> Self {
        Inbox {
            rx,
            first_tokens: VecDeque::new(),
            waiting: VecDeque::new(),
        }
    }

    /// The next command, if one was sent.
    pub(crate) fn try_recv(&mut self) -> Result<Command, TryRecvError> {
        let disconnected = self.pull();
        match self.take() {
            Some(cmd) => Ok(cmd),
            None if disconnected => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next command, waiting up to `timeout` for one.
    pub(crate) fn recv_timeout(&mut self, timeout: Duration) -> Result<Command, RecvTimeoutError> {
        match self.try_recv() {
            Ok(cmd) => return Ok(cmd),
            Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
            Err(TryRecvError::Empty) => {}
        }
        let cmd = self.rx.recv_timeout(timeout)?;
        self.keep(cmd);
        self.pull();
        // The one just queued, or a first token that came with it.
        self.take().ok_or(RecvTimeoutError::Timeout)
    }

    /// Moves what the channel holds into the queues; whether it is closed.
    fn pull(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.keep(cmd),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn keep(&mut self, cmd: Command) {
        match cmd {
            Command::FirstToken { .. } => self.first_tokens.push_back(cmd),
            cmd => self.waiting.push_back(cmd),
        }
    }

    fn take(&mut self) -> Option<Command> {
        self.first_tokens
            .pop_front()
            .or_else(|| self.waiting.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    fn first(transfer_id: u64) -> Command {
        Command::FirstToken {
            transfer_id,
            first: tandem_kv_transfer::FirstToken {
                id: 7,
                logprobs: None,
            },
        }
    }

    fn id_of(cmd: &Command) -> (&'static str, u64) {
        match cmd {
            Command::FirstToken { transfer_id, .. } => ("first", *transfer_id),
            Command::KvComplete { transfer_id } => ("complete", *transfer_id),
            Command::KvAborted { transfer_id, .. } => ("aborted", *transfer_id),
            _ => ("other", 0),
        }
    }

    #[test]
    fn first_tokens_go_ahead_and_everything_else_keeps_its_order() {
        let (tx, rx) = channel();
        let mut inbox = Inbox::new(rx);
        for cmd in [
            Command::KvAborted {
                transfer_id: 1,
                reason: String::new(),
            },
            Command::KvComplete { transfer_id: 2 },
            first(3),
            Command::KvComplete { transfer_id: 3 },
            first(4),
        ] {
            tx.send(cmd).expect("open");
        }
        let mut order = Vec::new();
        while let Ok(cmd) = inbox.try_recv() {
            order.push(id_of(&cmd));
        }
        assert_eq!(
            order,
            [
                ("first", 3),
                ("first", 4),
                ("aborted", 1),
                ("complete", 2),
                ("complete", 3)
            ]
        );
        // A first token sent while others wait is the next one out.
        tx.send(Command::KvComplete { transfer_id: 5 })
            .expect("open");
        tx.send(Command::KvComplete { transfer_id: 6 })
            .expect("open");
        assert_eq!(id_of(&inbox.try_recv().expect("queued")), ("complete", 5));
        tx.send(first(6)).expect("open");
        assert_eq!(
            id_of(&inbox.recv_timeout(Duration::ZERO).expect("queued")),
            ("first", 6)
        );
        assert_eq!(id_of(&inbox.try_recv().expect("queued")), ("complete", 6));
        assert!(matches!(inbox.try_recv(), Err(TryRecvError::Empty)));
        drop(tx);
        assert!(matches!(inbox.try_recv(), Err(TryRecvError::Disconnected)));
        assert!(matches!(
            inbox.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        ));
    }
}
